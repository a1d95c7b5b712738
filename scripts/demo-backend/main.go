// Command demo-backend is the backend of `make run`: a TCP server that
// greets each client with its own address, so you can see which backend
// l4lb chose, then echoes every line back.
//
//	demo-backend -listen 127.0.0.1:7001,127.0.0.1:7002
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:7001", "comma-separated addresses to serve")
	flag.Parse()
	for _, addr := range strings.Split(*listen, ",") {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			log.Fatalf("demo-backend: %v", err)
		}
		go serve(ln)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}

func serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Printf("demo-backend %s: %v", ln.Addr(), err)
			return
		}
		go echo(conn, ln.Addr().String())
	}
}

func echo(conn net.Conn, name string) {
	defer conn.Close()
	fmt.Fprintf(conn, "hello %s, this is backend %s; type a line and it comes back\n", conn.RemoteAddr(), name)
	lines := bufio.NewScanner(conn)
	for lines.Scan() {
		if _, err := fmt.Fprintf(conn, "%s: %s\n", name, lines.Text()); err != nil {
			return
		}
	}
}
