package l4

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

func TestSourceLimiter(t *testing.T) {
	var l sourceLimiter
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	for i := range 3 {
		if !l.acquire(a, 3) {
			t.Fatalf("acquire %d of 3 refused", i+1)
		}
	}
	if l.acquire(a, 3) {
		t.Fatal("fourth acquire with limit 3 granted")
	}
	if !l.acquire(b, 1) {
		t.Fatal("another address is limited by the first one's count")
	}
	l.release(a)
	if !l.acquire(a, 3) {
		t.Fatal("acquire after a release refused")
	}
	for range 3 {
		l.release(a)
	}
	l.release(b)
	for i := range l.shards {
		if n := len(l.shards[i].open); n != 0 {
			t.Fatalf("shard %d keeps %d addresses after every release", i, n)
		}
	}

	// Concurrent acquires never exceed the limit.
	const limit, goroutines = 5, 32
	var wg sync.WaitGroup
	var mu sync.Mutex // guards held and maxHeld
	held, maxHeld := 0, 0
	for range goroutines {
		wg.Go(func() {
			for range 200 {
				if l.acquire(a, limit) {
					mu.Lock()
					held++
					maxHeld = max(maxHeld, held)
					mu.Unlock()
					time.Sleep(time.Microsecond)
					mu.Lock()
					held--
					mu.Unlock()
					l.release(a)
				}
			}
		})
	}
	wg.Wait()
	if maxHeld > limit || l.count(a) != 0 {
		t.Fatalf("held at most %d (limit %d), %d left", maxHeld, limit, l.count(a))
	}
}

// BenchmarkAdmit is what admission costs a connection: admit, then
// releaseLease at its close, for a service without limits and one with
// max_connections and max_connections_per_source, from one core and from
// all of them at once (one client address per goroutine, as different
// clients on different cores).
func BenchmarkAdmit(b *testing.B) {
	for _, limited := range []bool{false, true} {
		cfg := &config.Service{Name: "bench", Balance: config.RoundRobin, Backends: []config.Backend{{Address: netip.MustParseAddrPort("127.0.0.1:1"), Weight: 1}}}
		name := "no_limits"
		if limited {
			cfg.MaxConnections, cfg.MaxConnectionsPerSource = 1<<20, 1<<20
			name = "limits"
		}
		s := NewService(cfg, hclog.NewNullLogger())
		r := s.route.Load()
		b.Run(name, func(b *testing.B) {
			src := netip.MustParseAddr("192.0.2.1")
			for b.Loop() {
				l, _, ok := s.admit(r, src)
				if !ok {
					b.Fatal("refused")
				}
				s.releaseLease(l)
			}
		})
		b.Run(name+"_parallel", func(b *testing.B) {
			var next atomic.Uint32
			b.RunParallel(func(pb *testing.PB) {
				src := netip.AddrFrom4([4]byte{192, 0, 2, byte(next.Add(1))})
				for pb.Next() {
					l, _, ok := s.admit(r, src)
					if !ok {
						b.Fatal("refused")
					}
					s.releaseLease(l)
				}
			})
		})
	}
}

func TestConnGate(t *testing.T) {
	g := newConnGate(2)
	if !g.tryAcquire() || !g.tryAcquire() {
		t.Fatal("gate of 2 refused the first two")
	}
	if g.tryAcquire() {
		t.Fatal("third acquire passed a full gate")
	}
	g.release()
	if !g.tryAcquire() {
		t.Fatal("acquire after a release refused")
	}
	if n := g.open.Load(); n != 2 {
		t.Errorf("open %d, want 2", n)
	}
}

func TestAccessList(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name        string
		allow, deny []netip.Prefix
		addr        string
		want        bool
	}{
		{"empty lists admit all", nil, nil, "192.0.2.1", true},
		{"in allow", []netip.Prefix{p("192.0.2.0/24")}, nil, "192.0.2.9", true},
		{"outside allow", []netip.Prefix{p("192.0.2.0/24")}, nil, "198.51.100.1", false},
		{"deny wins over allow", []netip.Prefix{p("192.0.2.0/24")}, []netip.Prefix{p("192.0.2.9/32")}, "192.0.2.9", false},
		{"deny only", nil, []netip.Prefix{p("10.0.0.0/8")}, "10.1.2.3", false},
		{"deny other family", nil, []netip.Prefix{p("::/0")}, "10.1.2.3", true},
		{"ipv6 allow", []netip.Prefix{p("2001:db8::/32")}, nil, "2001:db8::5", true},
		{"zoned link-local denied", nil, []netip.Prefix{p("fe80::/10")}, "fe80::1%eth0", false},
		{"zoned link-local allowed", []netip.Prefix{p("fe80::/10")}, nil, "fe80::1%eth0", true},
	}
	for _, tt := range tests {
		l := accessList{allow: tt.allow, deny: tt.deny}
		if got := l.admits(netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("%s: admits(%s) = %v, want %v", tt.name, tt.addr, got, tt.want)
		}
	}
}

// startProtectedService serves cfg (Listen, Backends and the protection
// settings are the caller's) on loopback and returns where clients dial.
func startProtectedService(t *testing.T, cfg *config.Service) (netip.AddrPort, *Service) {
	t.Helper()
	cfg.Name, cfg.Protocol, cfg.Workers = "protected", config.TCP, 1
	cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
	if cfg.Balance == "" {
		cfg.Balance, cfg.HashKey = config.Maglev, config.SourceIPPort
	}
	cfg.ConnectTimeout, cfg.IdleTimeout, cfg.DrainTimeout = time.Second, time.Minute, time.Second
	svc := NewService(cfg, hclog.NewNullLogger())
	return serveTest(t, svc, cfg.Listen), svc
}

func dialT(t *testing.T, addr netip.AddrPort) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dialClosed dials addr and checks that l4lb closes the connection at
// once, without a byte: the reset may even reach the client's connect.
func dialClosed(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if isReset(err) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	expectClosed(t, c)
}

// expectClosed checks that l4lb closes c without a byte, within 2 s.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || (err != io.EOF && !isReset(err)) {
		t.Fatalf("read %d bytes, %v: want the connection closed", n, err)
	}
}

func TestMaxConnectionsPerSourceAndService(t *testing.T) {
	echo := startEcho(t)
	cfg := &config.Service{Backends: []config.Backend{{Address: echo, Weight: 1}}}
	cfg.MaxConnectionsPerSource = 2
	cfg.MaxConnections = 3
	addr, svc := startProtectedService(t, cfg)

	a, b := dialT(t, addr), dialT(t, addr)
	roundTrip(t, a, "a")
	roundTrip(t, b, "b")
	dialClosed(t, addr) // a third from 127.0.0.1
	if n := svc.Rejected()[RejectMaxConnectionsPerSource]; n != 1 {
		t.Errorf("rejected max_connections_per_source = %d, want 1", n)
	}
	b.Close()
	// The slot comes back once l4lb has seen the close.
	deadline := time.Now().Add(2 * time.Second)
	for svc.sources.count(netip.MustParseAddr("127.0.0.1")) > 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	roundTrip(t, dialT(t, addr), "c")

	// Another source address is not limited by 127.0.0.1's count, but
	// counts toward the service's max_connections of 3 (a and c hold 2).
	d, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	roundTrip(t, d, "d")
	e, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, net.TCPAddrFromAddrPort(addr))
	switch {
	case isReset(err):
	case err != nil:
		t.Fatal(err)
	default:
		defer e.Close()
		expectClosed(t, e)
	}
	if n := svc.Rejected()[RejectMaxConnections]; n != 1 {
		t.Errorf("rejected max_connections = %d, want 1", n)
	}
}

// TestLimitSetByReloadCountsOpenConnections sets each limit with a
// reload while three connections are open: the new limit of 2 must count
// them, and turn the next client away.
func TestLimitSetByReloadCountsOpenConnections(t *testing.T) {
	tests := []struct {
		name   string
		set    func(*config.Service)
		reason RejectReason
	}{
		{"max_connections", func(c *config.Service) { c.MaxConnections = 2 }, RejectMaxConnections},
		{"max_connections_per_source", func(c *config.Service) { c.MaxConnectionsPerSource = 2 }, RejectMaxConnectionsPerSource},
		{"backend max_connections", func(c *config.Service) { c.Backends[0].MaxConnections = 2 }, RejectBackendsFull},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &config.Service{Backends: []config.Backend{{Address: startEcho(t), Weight: 1}}}
			addr, svc := startProtectedService(t, cfg)
			for i := range 3 {
				roundTrip(t, dialT(t, addr), fmt.Sprint("open ", i))
			}
			next := *cfg
			next.Backends = slices.Clone(cfg.Backends)
			tt.set(&next)
			svc.Update(&next)
			dialClosed(t, addr)
			if got := svc.Rejected()[tt.reason]; got != 1 {
				t.Errorf("rejected %s = %d, want 1", tt.reason, got)
			}
		})
	}
}

// TestErrorPathsGiveBackEveryCount runs clients of a trusted balancer
// into each way admission and dialing can fail (a backend that refuses,
// a reset in the middle of the header, a header timeout, a malformed
// header) on a service with every limit: once they are gone, the
// descriptor gate, the service and per-source counts, the backend's count
// and the list of connections reading their header must all be back at 0,
// or the limits would shrink with each failure.
func TestErrorPathsGiveBackEveryCount(t *testing.T) {
	cfg := &config.Service{Backends: []config.Backend{{Address: closedAddr(t), Weight: 1, MaxConnections: 5}}}
	cfg.MaxConnections, cfg.MaxConnectionsPerSource = 5, 5
	cfg.AcceptProxyProtocol = true
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	cfg.ProxyProtocolTimeout = 300 * time.Millisecond
	cfg.Name, cfg.Protocol, cfg.Workers = "counts", config.TCP, 1
	cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
	cfg.Balance, cfg.HashKey = config.Maglev, config.SourceIP
	cfg.ConnectTimeout, cfg.IdleTimeout, cfg.DrainTimeout = time.Second, time.Minute, time.Second
	svc := NewService(cfg, hclog.NewNullLogger())
	gate := newConnGate(100)
	svc.gate = gate // as the Server sets it, for the acceptors and the service alike
	lns, err := listenTCP(context.Background(), cfg.Listen, 1)
	if err != nil {
		t.Fatal(err)
	}
	var running sync.WaitGroup
	acceptors := startAcceptors(loops(), svc, gate, lns, 0, &running)
	t.Cleanup(func() { closeListeners(acceptors); running.Wait(); svc.Drain(time.Now()) })

	clients := []struct {
		name, send string
		reset      bool
	}{
		{"backend refuses", "PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello", false},
		{"reset mid-header", "PROXY TCP4 192.0.2.1 ", true},
		{"header timeout", "PROXY TCP4 192.0.2.1 ", false},
		{"malformed header", "GET / HTTP/1.0\r\n", false},
	}
	for _, cl := range clients {
		c, err := net.Dial("tcp", lns[0].addr.String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(cl.send))
		if cl.reset {
			eventually(t, cl.name+": accepted", func() bool { return gate.open.Load() > 0 })
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		} else {
			// l4lb closes each of the others: wait for it.
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
				t.Errorf("%s: read %d bytes, %v: want the connection closed", cl.name, n, err)
			}
			c.Close()
		}
		eventually(t, cl.name+": every count back at 0", func() bool {
			return gate.open.Load() == 0 && svc.open.Load() == 0 && svc.sources.count(netip.MustParseAddr("192.0.2.1")) == 0 &&
				svc.openConnections() == 0
		})
	}
}

func TestBackendMaxConnections(t *testing.T) {
	b1, b2 := startEcho(t), startEcho(t)
	cfg := &config.Service{Backends: []config.Backend{
		{Address: b1, Weight: 1, MaxConnections: 1},
		{Address: b2, Weight: 1, MaxConnections: 2},
	}}
	addr, svc := startProtectedService(t, cfg)
	for i := range 3 {
		roundTrip(t, dialT(t, addr), string(rune('a'+i)))
	}
	dialClosed(t, addr)
	if n := svc.Rejected()[RejectBackendsFull]; n != 1 {
		t.Errorf("rejected backends_full = %d, want 1", n)
	}
	for _, be := range svc.Backends() {
		want := int64(1)
		if be.addr == b2 {
			want = 2
		}
		if got := be.active.Load(); got != want {
			t.Errorf("backend %s has %d open, want its max_connections %d", be.addr, got, want)
		}
	}
}

func TestAccessListRejectsBeforeDial(t *testing.T) {
	accepted := make(chan struct{}, 10)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			c.Close()
		}
	}()
	cfg := &config.Service{Backends: []config.Backend{{Address: ln.Addr().(*net.TCPAddr).AddrPort(), Weight: 1}}}
	cfg.Deny = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	addr, svc := startProtectedService(t, cfg)
	dialClosed(t, addr)
	select {
	case <-accepted:
		t.Fatal("the backend got a connection from a denied client")
	case <-time.After(100 * time.Millisecond):
	}
	if n := svc.Rejected()[RejectDenied]; n != 1 {
		t.Errorf("rejected denied = %d, want 1", n)
	}
}

// TestProxyProtocolInAndOut runs a service that reads PROXY headers from
// 127.0.0.1 and sends v2 to its backend: the backend sees the address the
// client's header carried, and the client's bytes after it.
func TestProxyProtocolInAndOut(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type seen struct {
		h    proxyHeader
		data string
		err  error
	}
	got := make(chan seen, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		defer c.Close()
		h, err := readProxyHeader(c, time.Now().Add(5*time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		got <- seen{h, line, err}
	}()
	cfg := &config.Service{Backends: []config.Backend{{Address: ln.Addr().(*net.TCPAddr).AddrPort(), Weight: 1}}}
	cfg.ProxyProtocol = config.ProxyV2
	cfg.AcceptProxyProtocol = true
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	cfg.ProxyProtocolTimeout = 500 * time.Millisecond
	// The carried address is what the access list sees.
	cfg.Deny = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}
	addr, svc := startProtectedService(t, cfg)

	c := dialT(t, addr)
	c.Write([]byte("PROXY TCP4 192.0.2.7 198.51.100.1 40000 5432\r\nhello\n"))
	s := <-got
	if s.err != nil || s.h.src.String() != "192.0.2.7:40000" || s.h.dst.String() != "198.51.100.1:5432" || s.data != "hello\n" {
		t.Fatalf("backend saw %+v", s)
	}

	denied := dialT(t, addr)
	denied.Write([]byte("PROXY TCP4 203.0.113.5 198.51.100.1 40000 5432\r\n"))
	expectClosed(t, denied)
	bad := dialT(t, addr)
	bad.Write([]byte("PROXY TCP4 192.0.2.7 nonsense\r\n"))
	expectClosed(t, bad)
	slow := dialT(t, addr)
	slow.Write([]byte("PROXY TCP4 "))
	expectClosed(t, slow)
	r := svc.Rejected()
	if r[RejectDenied] != 1 || r[RejectBadProxyHeader] != 1 || r[RejectProxyHeaderTimeout] != 1 {
		t.Errorf("rejections %v: want one denied, one bad header, one timeout", r)
	}
}

func TestIsLocalShortage(t *testing.T) {
	_, err := net.Dial("tcp", "127.0.0.1:1")
	if isLocalShortage(err) {
		t.Errorf("connection refused counted as a local shortage: %v", err)
	}
	if !isLocalShortage(&net.OpError{Op: "dial", Err: syscall.EMFILE}) {
		t.Error("EMFILE not counted as a local shortage")
	}
	// epoll_ctl at fs.epoll.max_user_watches, as dialNext wraps it.
	if !isLocalShortage(&net.OpError{Op: "dial", Err: os.NewSyscallError("epoll_ctl", syscall.ENOSPC)}) {
		t.Error("ENOSPC (no epoll watch left) not counted as a local shortage")
	}
	// Out of local ports to one backend: ours, not the backend's fault,
	// yet another backend may still have ports.
	noPort := &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EADDRNOTAVAIL)}
	if blamesBackend(noPort) || isLocalShortage(noPort) {
		t.Errorf("EADDRNOTAVAIL: blames the backend %v, ends the connection %v; want neither", blamesBackend(noPort), isLocalShortage(noPort))
	}
	if !blamesBackend(err) {
		t.Errorf("a refused connect does not count against the backend: %v", err)
	}
	// No free local port for a UDP socket, whatever the destination, and
	// a flow socket the netpoller cannot watch.
	for _, e := range []error{os.NewSyscallError("connect", syscall.EAGAIN), errNotWatched} {
		if !isLocalShortage(&net.OpError{Op: "dial", Net: "udp", Err: e}) {
			t.Errorf("%v not counted as a local shortage", e)
		}
	}
}

// TestHalfCloseTimeout: the client half-closes, the backend reads the EOF
// and then neither writes nor closes. half_close_timeout cuts the
// connection, while a connection that keeps moving bytes after its
// half-close is left alone.
func TestHalfCloseTimeout(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	held := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			held <- c
			go func() {
				// Lingering: never closes. Sent "t", it answers "tick"
				// every 100ms until the client's side goes away; it reads
				// to EOF either way.
				buf := make([]byte, 1)
				for {
					n, err := c.Read(buf)
					if n == 1 && buf[0] == 't' {
						go func() {
							for {
								if _, err := c.Write([]byte("tick")); err != nil {
									return
								}
								time.Sleep(100 * time.Millisecond)
							}
						}()
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		for {
			select {
			case c := <-held:
				c.Close()
			default:
				return
			}
		}
	})
	cfg := &config.Service{Backends: []config.Backend{{Address: ln.Addr().(*net.TCPAddr).AddrPort(), Weight: 1}}}
	const halfClose = 300 * time.Millisecond
	cfg.HalfCloseTimeout = halfClose
	addr, _ := startProtectedService(t, cfg)

	quiet := dialT(t, addr).(*net.TCPConn)
	busy := dialT(t, addr).(*net.TCPConn)
	busy.Write([]byte("t"))
	buf := make([]byte, 4)
	busy.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(busy, buf); err != nil {
		t.Fatalf("first tick: %v", err)
	}
	quiet.CloseWrite()
	busy.CloseWrite()
	start := time.Now()
	expectClosed(t, quiet)
	// Inactivity counts from the last byte, a little before the
	// CloseWrite: hence the margin.
	if d := time.Since(start); d < halfClose-50*time.Millisecond {
		t.Errorf("closed after %v, before half_close_timeout %v", d, halfClose)
	}
	// The busy one receives ticks for well past the timeout.
	for time.Since(start) < 3*halfClose {
		if _, err := io.ReadFull(busy, buf); err != nil {
			t.Fatalf("busy half-closed connection cut after %v: %v", time.Since(start), err)
		}
	}
}

func TestProtectionChangedInReloadSummary(t *testing.T) {
	be := netip.MustParseAddrPort("10.0.0.1:80")
	base := config.Service{Name: "s", Backends: []config.Backend{{Address: be, Weight: 1}}}
	same := base
	if protectionChanged(&base, &same) {
		t.Error("identical services reported as changed")
	}
	denied := base
	denied.Deny = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	limited := base
	limited.Backends = []config.Backend{{Address: be, Weight: 1, MaxConnections: 5}}
	for name, sc := range map[string]*config.Service{"deny": &denied, "backend max_connections": &limited} {
		if !protectionChanged(&base, sc) {
			t.Errorf("%s change not reported", name)
		}
		if got := describeServiceChange(&base, sc); !strings.Contains(got, "protection") {
			t.Errorf("%s: summary %q does not say protection", name, got)
		}
	}
}

// TestHalfCloseTimeoutResets: the backend greets and half-closes, the
// client reads the greeting and the EOF, then lingers. half_close_timeout
// cuts it with a reset, which leaves no socket behind: the client's socket
// goes to CLOSE, not CLOSE_WAIT.

func TestHalfCloseTimeoutResets(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			c.Write([]byte("hello\n"))
			c.CloseWrite()
			go func() {
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	cfg := &config.Service{Backends: []config.Backend{{Address: ln.Addr().(*net.TCPAddr).AddrPort(), Weight: 1}}}
	const halfClose = 300 * time.Millisecond
	cfg.HalfCloseTimeout = halfClose
	addr, _ := startProtectedService(t, cfg)
	c := dialT(t, addr).(*net.TCPConn)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); err != nil || string(got) != "hello\n" {
		t.Fatalf("greeting: %q, %v", got, err)
	}
	start := time.Now()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for time.Since(start) < 5*time.Second {
		var info *unix.TCPInfo
		raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
		if err != nil {
			t.Fatal(err)
		}
		if info.State == tcpClose {
			if took := time.Since(start); took < halfClose-50*time.Millisecond {
				t.Errorf("cut after %v, before half_close_timeout %v", took, halfClose)
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("lingering client not reset within 5s of the backend's half-close")
}

// half_close_timeout counts from the half-close, not from the last byte
// before it: the deadline a half-close sets is half_close_timeout after
// it, even when the connection was quiet for longer than that before.
// Counted from the last byte, the timer fired in the same pass of the loop
// and cut the connection before the backend's answer to the EOF was read,
// unless an unacknowledged FIN still showed in the send queue.
func TestHalfCloseDeadlineCountsFromTheEOF(t *testing.T) {
	const halfClose = 300 * time.Millisecond
	l := &eventLoop{now: monotonicNow()}
	c := &proxyConn{loop: l, timerIndex: -1, idleTimeout: time.Hour, halfCloseTimeout: halfClose}
	c.lastActive = l.now - int64(10*time.Second) // quiet for 10 s
	c.startHalfClose()
	if want := l.now + int64(halfClose); c.timerAt != want {
		t.Fatalf("a half-close after 10 s of quiet set its deadline %v from now, want %v",
			time.Duration(c.timerAt-l.now), halfClose)
	}
}

// End to end: clients quiet for longer than half_close_timeout half-close
// to a backend that answers the EOF at once; each gets the answer.
func TestHalfCloseAfterQuietSpell(t *testing.T) {
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c) // echoes until the client's EOF
		c.Write([]byte("bye"))
	})
	const halfClose = 200 * time.Millisecond
	cfg := &config.Service{Backends: []config.Backend{{Address: backend, Weight: 1}}}
	cfg.HalfCloseTimeout = halfClose
	addr, _ := startProtectedService(t, cfg)
	const clients = 20
	errs := make(chan error, clients)
	for range clients {
		go func() {
			c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			one := make([]byte, 1)
			if _, err := c.Write([]byte("x")); err != nil {
				errs <- err
				return
			}
			if _, err := io.ReadFull(c, one); err != nil {
				errs <- err
				return
			}
			time.Sleep(2 * halfClose) // quiet for longer than half_close_timeout
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			if err == nil && string(got) != "bye" {
				err = fmt.Errorf("got %q, want %q", got, "bye")
			}
			errs <- err
		}()
	}
	for range clients {
		if err := <-errs; err != nil {
			t.Errorf("a client that half-closed after a quiet spell: %v", err)
		}
	}
}

// A client that half-closes and then resets while its backend is still
// silent: nothing reads the client socket after its EOF, yet the reset
// must end the connection at once, not at half_close_timeout or
// idle_timeout, with the backend working for a client long gone.
func TestResetAfterHalfCloseEndsTheConnection(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(io.Discard, c)
		<-hold // still working on the reply
	})
	addr, svc := startService(t, time.Minute, backend)
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("request"))
	c.CloseWrite()
	eventually(t, "the connection open to the backend", func() bool { return svc.openConnections() == 1 })
	time.Sleep(50 * time.Millisecond) // the EOF passed on
	c.SetLinger(0)
	c.Close() // a reset
	deadline := time.Now().Add(2 * time.Second)
	for svc.openConnections() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := svc.openConnections(); n != 0 {
		t.Fatalf("2 s after the client's reset %d connection is still open: it would wait for a timeout", n)
	}
}
