// Command soakclient is the misbehaving-client part of scripts/soak.sh:
// TCP clients that end their connections the ways that are easy to get
// wrong in a proxy, against a line-echo backend (scripts/demo-backend)
// behind it, on loopback addresses only.
//
//	soakclient -target 127.0.0.1:21103 -workers 4 -duration 30s
//
// Each worker loops until -duration over three kinds of connection:
//
//   - halfclose: read the greeting, send lines, shut down the write side,
//     read every echoed line until EOF. The proxy must pass the FIN on
//     and keep the other direction open until the backend closes.
//   - reset-mid: send a bulk of lines without reading, so bytes pile up
//     in both directions (the proxy splices them through a pipe), then
//     close with SO_LINGER 0: a reset in the middle of a transfer.
//   - reset-early: connect and reset at once, often before the proxy has
//     connected to its backend.
//
// It prints one line of counts at the end:
//
//	halfclose_ok=812 halfclose_failed=0 reset_mid=790 reset_early=801 dial_failed=0
//
// A failed half-close is not an error of this tool: a backend killed or
// drained under it ends the connection early. The soak reports the count.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

type counts struct {
	halfcloseOK, halfcloseFailed, resetMid, resetEarly, dialFailed atomic.Int64
}

func main() {
	target := flag.String("target", "", "IP:port of the proxy (loopback)")
	workers := flag.Int("workers", 4, "clients running at once")
	duration := flag.Duration("duration", 10*time.Second, "how long to run")
	flag.Parse()
	ap, err := netip.ParseAddrPort(*target)
	if err != nil || !ap.Addr().Unmap().IsLoopback() {
		fmt.Fprintln(os.Stderr, "soakclient: -target must be a loopback IP:port")
		os.Exit(2)
	}
	var c counts
	deadline := time.Now().Add(*duration)
	var wg sync.WaitGroup
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				switch rand.IntN(3) {
				case 0:
					halfClose(ap.String(), &c)
				case 1:
					resetMid(ap.String(), &c)
				default:
					resetEarly(ap.String(), &c)
				}
			}
		}()
	}
	wg.Wait()
	fmt.Printf("halfclose_ok=%d halfclose_failed=%d reset_mid=%d reset_early=%d dial_failed=%d\n",
		c.halfcloseOK.Load(), c.halfcloseFailed.Load(), c.resetMid.Load(), c.resetEarly.Load(), c.dialFailed.Load())
}

// dial connects with a bound on every phase, so a stuck proxy shows up as
// failures rather than a hung soak.
func dial(addr string, c *counts) *net.TCPConn {
	conn, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		c.dialFailed.Add(1)
		return nil
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn.(*net.TCPConn)
}

func halfClose(addr string, c *counts) {
	conn := dial(addr, c)
	if conn == nil {
		return
	}
	defer conn.Close()
	in := bufio.NewReader(conn)
	// The greeting says the backend is connected end to end.
	if _, err := in.ReadString('\n'); err != nil {
		c.halfcloseFailed.Add(1)
		return
	}
	lines := 1 + rand.IntN(200)
	var out bytes.Buffer
	for i := range lines {
		fmt.Fprintf(&out, "line %d of a half-closed connection\n", i)
	}
	if _, err := conn.Write(out.Bytes()); err != nil {
		c.halfcloseFailed.Add(1)
		return
	}
	if err := conn.CloseWrite(); err != nil {
		c.halfcloseFailed.Add(1)
		return
	}
	got := 0
	for {
		_, err := in.ReadString('\n')
		if err == io.EOF {
			break
		}
		if err != nil {
			c.halfcloseFailed.Add(1)
			return
		}
		got++
	}
	if got != lines {
		c.halfcloseFailed.Add(1)
		return
	}
	c.halfcloseOK.Add(1)
}

// resetMid writes up to 1 MiB without reading: the backend's echoes fill
// the proxy's way back and this socket's receive buffer, so both
// directions have bytes in flight when the reset comes.
func resetMid(addr string, c *counts) {
	conn := dial(addr, c)
	if conn == nil {
		return
	}
	chunk := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n"), 256)
	stopAt := time.Now().Add(time.Duration(rand.IntN(50)) * time.Millisecond)
	conn.SetWriteDeadline(stopAt.Add(20 * time.Millisecond))
	for sent := 0; sent < 1<<20 && time.Now().Before(stopAt); sent += len(chunk) {
		if _, err := conn.Write(chunk); err != nil {
			break // the write deadline: the way back is full
		}
	}
	conn.SetLinger(0)
	conn.Close()
	c.resetMid.Add(1)
}

func resetEarly(addr string, c *counts) {
	conn := dial(addr, c)
	if conn == nil {
		return
	}
	conn.SetLinger(0)
	conn.Close()
	c.resetEarly.Add(1)
}
