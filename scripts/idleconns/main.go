// Command idleconns opens many idle TCP connections through a proxy, for
// the "idle connection" rows of scripts/bench.sh: what each proxied
// connection costs in descriptors and memory while nothing moves.
//
//	idleconns serve -listen 127.0.0.1:17003
//	idleconns hold -connect 127.0.0.1:17103 -n 10000
//
// serve accepts connections, echoes each one's first byte and then holds
// it, reading (and discarding) until EOF. hold opens n connections to
// -connect, sends one byte on each and waits for its echo, so that every
// connection is proxied end to end (the proxy has dialed its backend and
// moved bytes both ways), prints "ready N" on stdout, and keeps them open
// and idle until SIGINT or SIGTERM.
//
// Client and server run as two processes so that each needs only n
// descriptors.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "hold":
		err = hold(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "idleconns:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: idleconns serve -listen ADDR | idleconns hold -connect ADDR -n N")
	os.Exit(2)
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:17003", "address to accept on")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors, most likely: say so and keep serving.
			fmt.Fprintln(os.Stderr, "idleconns: accept:", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go echoFirstByte(c)
	}
}

// echoFirstByte echoes c's first byte, then reads until EOF.
func echoFirstByte(c net.Conn) {
	defer c.Close()
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return
	}
	if _, err := c.Write(b[:]); err != nil {
		return
	}
	io.Copy(io.Discard, c)
}

func hold(args []string) error {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	connect := fs.String("connect", "", "address to connect to (the proxy)")
	n := fs.Int("n", 10000, "connections to open")
	parallel := fs.Int("parallel", 32, "connections being set up at once")
	timeout := fs.Duration("timeout", 60*time.Second, "time to set up all connections")
	fs.Parse(args)
	if *connect == "" || *n < 1 || *parallel < 1 {
		usage()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	conns := make([]net.Conn, *n)
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex // guards firstErr
		firstErr error
	)
	for range *parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c, err := open(ctx, *connect)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("connection %d of %d: %w", i+1, *n, err)
					}
					mu.Unlock()
					cancel()
					continue
				}
				conns[i] = c
			}
		}()
	}
	for i := range *n {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = fmt.Errorf("could not open %d connections within %s", *n, *timeout)
	}
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if firstErr != nil {
		return firstErr
	}
	fmt.Printf("ready %d\n", *n)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	return nil
}

// open connects to addr and exchanges one byte, so that the connection is
// known to reach the backend.
func open(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	var b [1]byte
	b[0] = 'x'
	if _, err := c.Write(b[:]); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("no echo: %w", err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
