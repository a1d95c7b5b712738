package health

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tcpServer answers every connection with reply(request line) and closes
// it; reply "" means "say nothing and hold the connection until cleanup".
// A reply starting with "banner:" is sent before reading anything.
func tcpServer(t *testing.T, reply func(req string) string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		close(done)
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if out, ok := strings.CutPrefix(reply(""), "banner:"); ok {
					io.WriteString(c, out)
					return
				}
				req, _ := bufio.NewReader(c).ReadString('\n')
				out := reply(req)
				if out == "" {
					<-done
					return
				}
				io.WriteString(c, out)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// closedPort returns a loopback TCP or UDP address where nothing listens.
func closedPort(t *testing.T, network string) netip.AddrPort {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ap := c.LocalAddr().(*net.UDPAddr).AddrPort()
		c.Close()
		return ap
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

func probe(t *testing.T, spec Spec, addr netip.AddrPort) error {
	t.Helper()
	p, err := NewProber(spec)
	if err != nil {
		t.Fatalf("NewProber(%+v): %v", spec, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), spec.Timeout)
	defer cancel()
	return p.Probe(ctx, addr)
}

func TestConnectProbe(t *testing.T) {
	spec := Spec{Kind: Connect, Timeout: time.Second}
	if err := probe(t, spec, tcpServer(t, func(string) string { return "hi\n" })); err != nil {
		t.Errorf("listening backend: %v", err)
	}
	err := probe(t, spec, closedPort(t, "tcp"))
	if err == nil || !strings.Contains(err.Error(), "connect") || !strings.Contains(err.Error(), "refused") {
		t.Errorf("closed port: %v; want a connect error saying refused", err)
	}
}

func TestSendExpectTCP(t *testing.T) {
	redisLike := tcpServer(t, func(req string) string {
		if req == "PING\r\n" {
			return "+PONG\r\n"
		}
		return "-ERR unknown command\r\n"
	})
	banner := tcpServer(t, func(string) string { return "banner:SSH-2.0-OpenSSH_9.6\r\n" })
	silent := tcpServer(t, func(string) string { return "" })
	short := tcpServer(t, func(string) string { return "+PO" })

	tests := []struct {
		name    string
		spec    Spec
		addr    netip.AddrPort
		wantErr string // "" for a pass
	}{
		{"ping pong", Spec{Send: "PING\r\n", Expect: "+PONG"}, redisLike, ""},
		{"wrong reply", Spec{Send: "PING\r\n", Expect: "+PANG"}, redisLike, `reply "+PONG\r\n" does not start with "+PANG"`},
		{"error reply", Spec{Send: "HELLO\r\n", Expect: "+PONG"}, redisLike, `does not start with "+PONG"`},
		{"regex", Spec{Send: "PING\r\n", ExpectRegex: `^\+P[A-Z]+NG`}, redisLike, ""},
		{"regex mismatch", Spec{Send: "PING\r\n", ExpectRegex: `^\+OK`}, redisLike, `does not match expect_regex`},
		{"banner without send", Spec{ExpectRegex: `^SSH-2\.0-`}, banner, ""},
		{"no reply times out", Spec{Send: "PING\r\n", Expect: "+PONG"}, silent, "read reply: timed out"},
		{"reply cut short", Spec{Send: "PING\r\n", Expect: "+PONG"}, short, `reply "+PO" does not match expect "+PONG": read reply: connection closed`},
		{"refused", Spec{Send: "PING\r\n", Expect: "+PONG"}, closedPort(t, "tcp"), "connect:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := tt.spec
			spec.Kind, spec.Network, spec.Timeout = SendExpect, "tcp", 300*time.Millisecond
			err := probe(t, spec, tt.addr)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("probe failed: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("probe error %v; want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// udpEcho answers each datagram with prefix + the datagram, unless the
// datagram is "quiet", which it drops.
func udpEcho(t *testing.T, prefix string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			if string(buf[:n]) == "quiet" {
				continue
			}
			c.WriteTo(append([]byte(prefix), buf[:n]...), from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestSendExpectUDP(t *testing.T) {
	echo := udpEcho(t, "echo:")
	tests := []struct {
		name    string
		spec    Spec
		addr    netip.AddrPort
		wantErr string
	}{
		{"echo", Spec{Send: "ping", Expect: "echo:ping"}, echo, ""},
		{"regex", Spec{Send: "ping", ExpectRegex: "^echo:p.ng$"}, echo, ""},
		{"wrong reply", Spec{Send: "ping", Expect: "pong"}, echo, `reply "echo:ping" does not start with "pong"`},
		{"regex mismatch", Spec{Send: "ping", ExpectRegex: "^pong"}, echo, `reply "echo:ping" does not match expect_regex`},
		{"short reply", Spec{Send: "p", Expect: "echo:ping"}, echo, `reply "echo:p" does not start with "echo:ping"`},
		{"no reply times out", Spec{Send: "quiet", Expect: "echo:"}, echo, "read reply: timed out"},
		{"port unreachable", Spec{Send: "ping", Expect: "echo:"}, closedPort(t, "udp"), "refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := tt.spec
			spec.Kind, spec.Network, spec.Timeout = SendExpect, "udp", 300*time.Millisecond
			err := probe(t, spec, tt.addr)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("probe failed: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("probe error %v; want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestProbeTimeoutIsDeadlineExceeded(t *testing.T) {
	silent := tcpServer(t, func(string) string { return "" })
	err := probe(t, Spec{Kind: SendExpect, Network: "tcp", Timeout: 100 * time.Millisecond, Expect: "x"}, silent)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("timeout error %v is not os.ErrDeadlineExceeded", err)
	}
}

func TestProbeCancel(t *testing.T) {
	silent := tcpServer(t, func(string) string { return "" })
	p, err := NewProber(Spec{Kind: SendExpect, Network: "tcp", Expect: "x"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Probe(ctx, silent) }()
	time.Sleep(50 * time.Millisecond) // let it connect and wait for the reply
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled probe returned %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not stop a probe waiting for a reply")
	}
}

func TestNewProberRejects(t *testing.T) {
	for _, spec := range []Spec{
		{Kind: "http"},
		{Kind: SendExpect, Network: "sctp", Expect: "x"},
		{Kind: SendExpect, Network: "tcp"},
		{Kind: SendExpect, Network: "tcp", Expect: "x", ExpectRegex: "x"},
		{Kind: SendExpect, Network: "tcp", ExpectRegex: "("},
	} {
		if _, err := NewProber(spec); err == nil {
			t.Errorf("NewProber(%+v) accepted", spec)
		}
	}
}

// TestLocalShortage checks which probe errors are this host's shortage
// (the probe decides nothing) and which are the backend's failure.
func TestLocalShortage(t *testing.T) {
	dial := func(op string, errno syscall.Errno) error {
		return fmt.Errorf("connect: %w", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError(op, errno)})
	}
	tests := []struct {
		err   error
		local bool
	}{
		{dial("socket", syscall.EMFILE), true},
		{dial("socket", syscall.ENFILE), true},
		{dial("socket", syscall.ENOBUFS), true},
		{dial("socket", syscall.ENOMEM), true},
		{dial("epollctl", syscall.ENOSPC), true},
		{dial("connect", syscall.EADDRNOTAVAIL), true},
		{dial("connect", syscall.EAGAIN), true}, // no free UDP port
		{dial("connect", syscall.ECONNREFUSED), false},
		{dial("connect", syscall.EHOSTUNREACH), false},
		{dial("connect", syscall.ECONNRESET), false},
		{fmt.Errorf("read reply: timed out: %w", os.ErrDeadlineExceeded), false},
		{errClosedEarly, false},
		{nil, false},
	}
	for _, tt := range tests {
		if got := LocalShortage(tt.err); got != tt.local {
			t.Errorf("LocalShortage(%v) = %v, want %v", tt.err, got, tt.local)
		}
	}
}

// TestProbeSendsProxyHeader checks that Spec.ProxyHeader goes first: alone
// on a connect probe's connection, before Send on a TCP send_expect probe
// (to a backend that answers nothing without it), and at the start of the
// UDP probe datagram.
func TestProbeSendsProxyHeader(t *testing.T) {
	const header = "HEADER\r\n"
	t.Run("connect", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		got := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			b, _ := io.ReadAll(c) // until the probe closes
			got <- string(b)
		}()
		spec := Spec{Kind: Connect, Network: "tcp", Timeout: time.Second, ProxyHeader: header}
		if err := probe(t, spec, ln.Addr().(*net.TCPAddr).AddrPort()); err != nil {
			t.Fatalf("probe: %v", err)
		}
		if b := <-got; b != header {
			t.Errorf("connect probe sent %q, want the header %q alone", b, header)
		}
	})
	t.Run("send_expect tcp", func(t *testing.T) {
		needsHeader := startLineServer(t, func(lines []string) string {
			if len(lines) == 2 && lines[0] == header && lines[1] == "PING\r\n" {
				return "+PONG\r\n"
			}
			return ""
		})
		spec := Spec{Kind: SendExpect, Network: "tcp", Timeout: time.Second, Send: "PING\r\n", Expect: "+PONG", ProxyHeader: header}
		if err := probe(t, spec, needsHeader); err != nil {
			t.Errorf("probe of a backend that requires the header: %v", err)
		}
	})
	t.Run("send_expect udp", func(t *testing.T) {
		spec := Spec{Kind: SendExpect, Network: "udp", Timeout: time.Second, Send: "ping", Expect: "echo:" + header + "ping", ProxyHeader: header}
		if err := probe(t, spec, udpEcho(t, "echo:")); err != nil {
			t.Errorf("want one datagram holding the header, then send: %v", err)
		}
	})
}

// startLineServer reads two lines from each connection and answers with
// reply(lines), or closes it at once when reply returns "".
func startLineServer(t *testing.T, reply func(lines []string) string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				r := bufio.NewReader(c)
				var lines []string
				for range 2 {
					l, err := r.ReadString('\n')
					if err != nil {
						return
					}
					lines = append(lines, l)
				}
				io.WriteString(c, reply(lines))
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}
