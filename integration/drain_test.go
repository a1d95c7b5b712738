package integration

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestDrain checks what SIGTERM does: l4lb stops accepting at once, lets
// the open connections finish, and exits 0 as soon as they have, or when
// drain_timeout runs out.
func TestDrain(t *testing.T) {
	t.Run("open connection finishes", func(t *testing.T) {
		const drainTimeout = 10 * time.Second
		top := newTopology(t, 1, 2, 2)
		svc := echoService(t, top, "echo", echoPort, false, echo)
		svc.DrainTimeout = drainTimeout.String()
		l := startLB(t, top.LB, configTOML(svc))
		c := top.Clients[0]

		conn, err := dialFrom(c.NS, c.Addrs4[0], svc.Listen)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(ioTimeout))
		br := bufio.NewReader(conn)
		if _, err := readGreeting(br); err != nil {
			t.Fatal(err)
		}
		roundTrip(t, conn, br, "before SIGTERM")

		start := time.Now()
		l.Signal(t, syscall.SIGTERM)
		if err := l.WaitFor("stderr", "stopping", 5*time.Second); err != nil {
			t.Fatalf("after SIGTERM: %v", err)
		}
		roundTrip(t, conn, br, "after SIGTERM")
		waitRefused(t, c.NS, c.Addrs4[1], svc.Listen)
		roundTrip(t, conn, br, "after new connections were refused")
		if l.Exited() {
			t.Fatalf("l4lb exited with %v while a connection was open", l.state)
		}

		if err := conn.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		if rest, err := io.ReadAll(br); err != nil || len(rest) > 0 {
			t.Fatalf("after CloseWrite: read %q, %v; want a clean EOF", rest, err)
		}
		// Well before drain_timeout: l4lb must not wait for it once no
		// connection is left.
		const exitWithin = 2 * time.Second
		state := l.WaitExit(exitWithin)
		if state == nil {
			t.Fatalf("l4lb still running %v after its only connection closed (drain_timeout %v)", exitWithin, drainTimeout)
		}
		l.checkExit(t, state)
		t.Logf("l4lb exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	})

	t.Run("drain timeout runs out", func(t *testing.T) {
		const drainTimeout = time.Second
		top := newTopology(t, 1, 1, 2)
		svc := echoService(t, top, "echo", echoPort, false, echo)
		svc.DrainTimeout = drainTimeout.String()
		l := startLB(t, top.LB, configTOML(svc))
		c := top.Clients[0]

		conn, err := dialFrom(c.NS, c.Addrs4[0], svc.Listen)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(ioTimeout))
		br := bufio.NewReader(conn)
		if _, err := readGreeting(br); err != nil {
			t.Fatal(err)
		}

		start := time.Now()
		l.Signal(t, syscall.SIGTERM)
		state := l.WaitExit(drainTimeout + 5*time.Second)
		elapsed := time.Since(start)
		if state == nil {
			t.Fatalf("l4lb still running %v after SIGTERM with drain_timeout %v", elapsed, drainTimeout)
		}
		l.checkExit(t, state)
		if elapsed < drainTimeout {
			t.Errorf("l4lb exited %v after SIGTERM, before drain_timeout %v, with a connection open", elapsed, drainTimeout)
		}
		// The open connection was cut: the client sees EOF or a reset,
		// not silence.
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := br.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("read after l4lb exited: %v; want EOF or a reset", err)
		}
		t.Logf("l4lb exited %v after SIGTERM", elapsed.Round(time.Millisecond))
	})
}

// roundTrip sends a line on an echo connection and checks that it comes
// back.
func roundTrip(t *testing.T, conn net.Conn, br *bufio.Reader, what string) {
	t.Helper()
	msg := fmt.Sprintf("ping %s\n", what)
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	got, err := br.ReadString('\n')
	if err != nil || got != msg {
		t.Fatalf("%s: read %q, %v; want %q", what, got, err, msg)
	}
}

// waitRefused dials dst from src until the connection is refused. l4lb
// logs "stopping" just before it closes its listeners and prints nothing
// once they are closed, so a few dials may still land in the moment
// between; they are counted and logged, and 2 s of them fail the test.
func waitRefused(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort) {
	t.Helper()
	const attempts, pause = 100, 20 * time.Millisecond
	for i := range attempts {
		conn, err := dialFrom(ns, src, dst)
		if err == nil {
			conn.Close()
			time.Sleep(pause)
			continue
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("new connection after SIGTERM: %v; want connection refused", err)
		}
		if i > 0 {
			t.Logf("new connections were refused after %d accepted ones", i)
		}
		return
	}
	t.Fatalf("new connections still accepted %v after SIGTERM", attempts*pause)
}
