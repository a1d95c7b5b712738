package l4

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/listener"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// testNet is this test process's own second octet in 127/8, for tests that
// need a fixed listen address (a service a reload brings back): two test
// processes on one host, such as two checkouts tested at once, would
// otherwise bind the same address into one SO_REUSEPORT group and take
// each other's clients.
var testNet = 89 + os.Getpid()%160

// ownAddr moves a "127.88.x.y:port" address into testNet.
func ownAddr(addr string) string {
	return fmt.Sprintf("127.%d.%s", testNet, strings.TrimPrefix(addr, "127.88."))
}

// udpEcho is a UDP backend on loopback that answers each datagram with
// "NAME:" and the datagram, until stop or cleanup. peers gets the address
// each datagram came from (the flow socket's), while it has room.
type udpEcho struct {
	addr  netip.AddrPort
	peers chan netip.AddrPort
	// stop closes the port: datagrams to it then draw ICMP port
	// unreachable.
	stop func()
}

func newUDPEcho(t testing.TB, name string) *udpEcho { return newUDPEchoOn(t, name, loopback) }

// newUDPEchoOn is newUDPEcho on another loopback address.
func newUDPEchoOn(t testing.TB, name string, addr netip.Addr) *udpEcho {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	e := &udpEcho{addr: c.LocalAddr().(*net.UDPAddr).AddrPort(), peers: make(chan netip.AddrPort, 100)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, udpBufSize)
		prefix := []byte(name + ":")
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf[len(prefix):])
			if err != nil {
				return
			}
			select {
			case e.peers <- from:
			default:
			}
			copy(buf, prefix)
			c.WriteToUDPAddrPort(buf[:len(prefix)+n], from)
		}
	}()
	e.stop = sync.OnceFunc(func() {
		c.Close()
		<-done
	})
	t.Cleanup(e.stop)
	return e
}

// startUDPEcho is newUDPEcho's address.
func startUDPEcho(t testing.TB, name string) netip.AddrPort { return newUDPEcho(t, name).addr }

// udpConfig is a Maglev UDP service over backends, spreading a client's
// ports; tests change the fields they care about.
func udpConfig(backends ...netip.AddrPort) *config.Service {
	cfg := &config.Service{
		Name: "udp", Protocol: config.UDP, Balance: config.Maglev, HashKey: config.SourceIPPort,
		Workers: 2, ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: 5 * time.Second,
		MaxFlows: 1000, Health: config.Health{Kind: config.HealthNone},
	}
	for _, b := range backends {
		cfg.Backends = append(cfg.Backends, config.Backend{Address: b, Weight: 100})
	}
	return cfg
}

// startUDPService binds cfg.Workers loopback sockets to one port, sets
// cfg.Listen to it and runs the service until cleanup.
func startUDPService(t testing.TB, cfg *config.Service) (*Service, *udpProxy) {
	t.Helper()
	svc, p := newUDPService(t, cfg)
	p.start()
	return svc, p
}

// newUDPService is startUDPService without starting the workers.
func newUDPService(t testing.TB, cfg *config.Service) (*Service, *udpProxy) {
	t.Helper()
	ctx := context.Background()
	first, err := listener.ListenUDP(ctx, netip.AddrPortFrom(loopback, 0), 1)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = first[0].LocalAddr().(*net.UDPAddr).AddrPort()
	conns := first
	if cfg.Workers > 1 {
		more, err := listener.ListenUDP(ctx, cfg.Listen, cfg.Workers-1)
		if err != nil {
			first[0].Close()
			t.Fatal(err)
		}
		conns = append(conns, more...)
	}
	svc := NewService(cfg, hclog.NewNullLogger())
	p := newUDPProxy(svc, conns, hclog.NewNullLogger())
	t.Cleanup(func() {
		p.Close()
		// Its health checks too: left running, they probe ports that
		// later tests' sockets may get, and a stray probe's reply reaches
		// one of their clients.
		svc.Drain(time.Now())
	})
	return svc, p
}

// udpClient is a client socket on loopback.
type udpClient struct {
	t    testing.TB
	conn *net.UDPConn
	to   netip.AddrPort
}

func newUDPClient(t testing.TB, to netip.AddrPort) *udpClient {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &udpClient{t: t, conn: c, to: to}
}

func (c *udpClient) addr() netip.AddrPort { return c.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// exchange sends msg and returns the name of the backend that echoed it;
// it fails the test unless the reply comes from the service address.
func (c *udpClient) exchange(msg string) string {
	c.t.Helper()
	name, err := c.tryExchange(msg, 2*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	return name
}

func (c *udpClient) tryExchange(msg string, timeout time.Duration) (string, error) {
	if _, err := c.conn.WriteToUDPAddrPort([]byte(msg), c.to); err != nil {
		return "", err
	}
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, udpBufSize)
	n, from, err := c.conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		return "", fmt.Errorf("from %s: no reply to %.40q: %w", c.addr(), msg, err)
	}
	if from != c.to {
		return "", fmt.Errorf("reply from %s, want the service address %s", from, c.to)
	}
	name, body, ok := strings.Cut(string(buf[:n]), ":")
	if !ok || body != msg {
		return "", fmt.Errorf("reply %.40q to %.40q", buf[:n], msg)
	}
	return name, nil
}

// backendNames maps backend addresses to the names their echoes give.
type backendNames map[netip.AddrPort]string

func TestUDPForwardStickyAndPlanned(t *testing.T) {
	names := backendNames{}
	var addrs []netip.AddrPort
	for _, n := range []string{"a", "b", "c"} {
		a := startUDPEcho(t, n)
		names[a] = n
		addrs = append(addrs, a)
	}
	cfg := udpConfig(addrs...)
	svc, _ := startUDPService(t, cfg)
	plan := NewPlan(cfg)

	const clients, rounds = 24, 5
	cs := make([]*udpClient, clients)
	for i := range cs {
		cs[i] = newUDPClient(t, cfg.Listen)
	}
	used := map[string]int{}
	for r := range rounds {
		for i, c := range cs {
			got := c.exchange(fmt.Sprintf("client %d round %d", i, r))
			want, _ := plan.First(c.addr())
			if got != names[want] {
				t.Errorf("client %s round %d: backend %s, plan says %s", c.addr(), r, got, names[want])
			}
			if r == 0 {
				used[got]++
			}
		}
	}
	if len(used) < 2 {
		t.Errorf("24 clients all on %v; want a spread", used)
	}
	if _, ok := svc.UDPStats(); !ok {
		t.Fatal("UDPStats: not a UDP service")
	}
	// The worker and the readers count datagrams after their sendmmsg
	// returns, which may be after the client has read the last reply.
	st := waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool {
		return st.DatagramsToClient >= clients*rounds && st.DatagramsToBackend >= clients*rounds
	})
	if st.FlowsCreated != clients || st.FlowsActive != clients || st.DatagramsToBackend != clients*rounds ||
		st.DatagramsToClient != clients*rounds {
		t.Errorf("stats %+v; want %d flows created and active, %d datagrams each way", st, clients, clients*rounds)
	}
	var flows int64
	for _, be := range svc.Backends() {
		bs := be.UDPStats()
		flows += bs.FlowsActive
		if bs.BytesToClient <= bs.BytesToBackend && bs.DatagramsToBackend > 0 {
			t.Errorf("backend %s: %d bytes back for %d sent; the echo adds a prefix", be.Addr(), bs.BytesToClient, bs.BytesToBackend)
		}
	}
	if flows != clients {
		t.Errorf("backends hold %d flows, want %d", flows, clients)
	}
}

// TestUDPLargeDatagram sends the largest IPv4 UDP payload through.
func TestUDPLargeDatagram(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"))
	startUDPService(t, cfg)
	c := newUDPClient(t, cfg.Listen)
	msg := strings.Repeat("x", 65507-len("a:"))
	if got := c.exchange(msg); got != "a" {
		t.Errorf("backend %q", got)
	}
}

// TestUDPProxyHeaderOnIPv4Wildcard checks the PROXY v2 header a service
// on 0.0.0.0 puts before an IPv4 client's datagrams: UDP over IPv4 (0x12)
// with the client's address as it is. A dual-stack socket would have sent
// UDP over IPv6 with a ::ffff:-mapped client and [::] as destination.
func TestUDPProxyHeaderOnIPv4Wildcard(t *testing.T) {
	backend, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	cfg := udpConfig(backend.LocalAddr().(*net.UDPAddr).AddrPort())
	cfg.Workers = 1
	cfg.ProxyProtocol = config.ProxyV2
	conns, err := listener.ListenUDP(context.Background(), netip.MustParseAddrPort("0.0.0.0:0"), 1)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = conns[0].LocalAddr().(*net.UDPAddr).AddrPort()
	p := newUDPProxy(NewService(cfg, hclog.NewNullLogger()), conns, hclog.NewNullLogger())
	t.Cleanup(p.Close)
	p.start()

	c := newUDPClient(t, netip.AddrPortFrom(loopback, cfg.Listen.Port()))
	if _, err := c.conn.WriteToUDPAddrPort([]byte("q"), c.to); err != nil {
		t.Fatal(err)
	}
	backend.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 256)
	n, _, err := backend.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	// The v2 header of an IPv4 datagram: 16 bytes, then source and
	// destination addresses (4 bytes each) and ports (2 each).
	got := buf[:n]
	if n < 28 || got[13] != proxyV2UDP4 {
		t.Fatalf("datagram %x: want a v2 header of family 0x12 (UDP over IPv4)", got)
	}
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(got[16:20])), binary.BigEndian.Uint16(got[24:]))
	dst := netip.AddrPortFrom(netip.AddrFrom4([4]byte(got[20:24])), binary.BigEndian.Uint16(got[26:]))
	if src != c.addr() || dst.Port() != cfg.Listen.Port() || string(got[28:]) != "q" {
		t.Errorf("header %s -> %s, payload %q: want %s -> port %d, %q", src, dst, got[28:], c.addr(), cfg.Listen.Port(), "q")
	}
}

func TestUDPMaxFlows(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"))
	cfg.MaxFlows = 2
	svc, _ := startUDPService(t, cfg)
	first, second, third := newUDPClient(t, cfg.Listen), newUDPClient(t, cfg.Listen), newUDPClient(t, cfg.Listen)
	first.exchange("1")
	second.exchange("2")
	if _, err := third.tryExchange("3", 300*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("third flow past max_flows = 2: %v; want no reply", err)
	}
	first.exchange("1 again")
	second.exchange("2 again")
	st, _ := svc.UDPStats()
	if st.FlowsRefused != 1 || st.Drops[DropMaxFlows] != 1 || st.FlowsActive != 2 {
		t.Errorf("stats %+v; want 1 refused, 1 max_flows drop, 2 active", st)
	}
}

// waitUDPStats polls the stats until ok says yes, for at most timeout:
// expiry has no event to wait for.
func waitUDPStats(t *testing.T, svc *Service, timeout time.Duration, ok func(UDPStats) bool) UDPStats {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, _ := svc.UDPStats()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats still %+v after %v", st, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestUDPIdleExpiry(t *testing.T) {
	const idle = 400 * time.Millisecond
	cfg := udpConfig(startUDPEcho(t, "a"))
	cfg.IdleTimeout = idle
	svc, _ := startUDPService(t, cfg)
	c := newUDPClient(t, cfg.Listen)
	c.exchange("hello")
	last := time.Now()
	// Datagrams within idle_timeout keep the flow.
	for range 3 {
		time.Sleep(idle / 2)
		c.exchange("still here")
		last = time.Now()
	}
	waitUDPStats(t, svc, idle+2*time.Second, func(st UDPStats) bool { return st.FlowsExpired == 1 })
	elapsed := time.Since(last)
	if elapsed < idle {
		t.Errorf("flow expired %v after its last datagram, before idle_timeout %v", elapsed, idle)
	}
	st, _ := svc.UDPStats()
	if st.FlowsActive != 0 || st.FlowsCreated != 1 {
		t.Errorf("stats %+v; want 1 flow created, none active", st)
	}
	c.exchange("back")
	if st, _ := svc.UDPStats(); st.FlowsCreated != 2 {
		t.Errorf("flows created %d after the client came back, want 2", st.FlowsCreated)
	}
}

// TestUDPDrainRemovedBackend removes a backend with a flow on it: the flow
// keeps its backend until drain_timeout, new flows avoid it, and after the
// drain the client starts over on a remaining backend.
func TestUDPDrainRemovedBackend(t *testing.T) {
	a, b := startUDPEcho(t, "a"), startUDPEcho(t, "b")
	cfg := udpConfig(a, b)
	cfg.DrainTimeout = 500 * time.Millisecond
	svc, _ := startUDPService(t, cfg)

	var onB, onA *udpClient
	for range 64 {
		c := newUDPClient(t, cfg.Listen)
		switch c.exchange("which") {
		case "b":
			onB = c
		case "a":
			onA = c
		}
		if onA != nil && onB != nil {
			break
		}
	}
	if onA == nil || onB == nil {
		t.Fatal("64 clients did not reach both backends")
	}

	// Clients before onB may have landed on b too: each of their flows
	// is drained.
	onBFlows := backendOf(svc, b).active.Load()
	next := *cfg
	next.Backends = cfg.Backends[:1] // a only
	start := time.Now()
	svc.Update(&next)
	if got := onB.exchange("during drain"); got != "b" {
		t.Errorf("flow on the removed backend went to %s during the drain", got)
	}
	if got := onA.exchange("kept"); got != "a" {
		t.Errorf("flow on the kept backend went to %s", got)
	}
	for range 8 {
		if got := newUDPClient(t, cfg.Listen).exchange("new"); got != "a" {
			t.Errorf("new flow went to removed backend %s", got)
		}
	}
	waitUDPStats(t, svc, 3*time.Second, func(UDPStats) bool {
		for _, be := range svc.Backends() {
			if be.Addr() == b && be.UDPStats().FlowsActive > 0 {
				return false
			}
		}
		return true
	})
	if elapsed := time.Since(start); elapsed < next.DrainTimeout {
		t.Errorf("drain ended after %v, before drain_timeout %v", elapsed, next.DrainTimeout)
	}
	if got := onB.exchange("after drain"); got != "a" {
		t.Errorf("after the drain the client went to %s, want a", got)
	}
	if got := onA.exchange("kept"); got != "a" {
		t.Errorf("flow on the kept backend went to %s", got)
	}
	// The worker counts a drained flow once it takes it out of its table,
	// at its next datagram or sweep.
	waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool { return st.FlowsClosed == uint64(onBFlows) })
}

// TestUDPShutdownDrain: Drain stops new flows and returns once the open
// ones idle out, before its deadline.
func TestUDPShutdownDrain(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"))
	cfg.IdleTimeout = 300 * time.Millisecond
	svc, p := startUDPService(t, cfg)
	old := newUDPClient(t, cfg.Listen)
	old.exchange("before")

	done := make(chan struct{})
	start := time.Now()
	go func() {
		p.Drain(time.Now().Add(10 * time.Second))
		close(done)
	}()
	waitUDPStats(t, svc, time.Second, func(UDPStats) bool { return p.draining.Load() })
	old.exchange("during drain")
	if _, err := newUDPClient(t, cfg.Listen).tryExchange("new", 200*time.Millisecond); err == nil {
		t.Error("a new flow was opened while draining")
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return after the only flow idled out")
	}
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("Drain took %v with idle_timeout %v", elapsed, cfg.IdleTimeout)
	}
	st, _ := svc.UDPStats()
	if st.Drops[DropDraining] != 1 || st.FlowsExpired != 1 {
		t.Errorf("stats %+v; want 1 draining drop and 1 expired flow", st)
	}
}

func TestUDPNoBackend(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"))
	cfg.Backends[0].Weight = 0
	svc, _ := startUDPService(t, cfg)
	if _, err := newUDPClient(t, cfg.Listen).tryExchange("x", 200*time.Millisecond); err == nil {
		t.Fatal("reply without a backend of weight > 0")
	}
	if st, _ := svc.UDPStats(); st.Drops[DropNoBackend] != 1 {
		t.Errorf("drops %v; want 1 no_backend", st.Drops)
	}
}

func TestUDPWheel(t *testing.T) {
	var wh udpWheel
	wh.next = 10
	flows := make([]*udpFlow, 4)
	for i := range flows {
		flows[i] = &udpFlow{slot: -1}
	}
	wh.insert(flows[0], 12)
	wh.insert(flows[1], 12)
	wh.insert(flows[2], 5) // past: goes to next
	wh.insert(flows[3], 12+udpWheelSlots)
	if flows[2].slot != 10 {
		t.Errorf("a past tick went to slot %d, want 10", flows[2].slot)
	}
	count := func(s int) int {
		n := 0
		for f := wh.slots[s]; f != nil; f = f.wNext {
			n++
		}
		return n
	}
	if count(12) != 3 {
		t.Errorf("slot 12 holds %d flows, want 3 (one a lap later)", count(12))
	}
	wh.unlink(flows[1])
	wh.unlink(flows[1]) // twice is harmless
	if count(12) != 2 || flows[1].slot != -1 {
		t.Errorf("after unlink slot 12 holds %d flows", count(12))
	}
}

func TestDropReasonNames(t *testing.T) {
	seen := map[string]bool{}
	for r := range NumDropReasons {
		name := r.String()
		if name == "" || name == "unknown" || seen[name] {
			t.Errorf("reason %d named %q", r, name)
		}
		seen[name] = true
	}
	if NumDropReasons.String() != "unknown" {
		t.Error("out of range reason has a name")
	}
}

// startUDPSink runs a backend that reads and drops every datagram, so
// that benchmark sends never find its socket full, until cleanup.
func startUDPSink(b *testing.B) netip.AddrPort {
	sink, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { sink.Close() })
	go func() {
		buf := make([]byte, udpBufSize)
		for {
			if _, _, err := sink.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
		}
	}()
	return sink.LocalAddr().(*net.UDPAddr).AddrPort()
}

// BenchmarkUDPForward measures the client-to-backend path of an open flow:
// the worker's table lookup, counters and send. The backend drains its
// socket so that sends never find it full.
func BenchmarkUDPForward(b *testing.B) {
	for _, size := range []int{64, 1200} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			cfg := udpConfig(startUDPSink(b))
			cfg.Workers = 1
			// The workers are not started: the benchmark's goroutine is
			// the worker that owns the table.
			svc, p := newUDPService(b, cfg)
			w := p.workers[0]
			client := netip.AddrPortFrom(loopback, 40000)
			msg := bytes.Repeat([]byte{'x'}, size)
			// Open the flow first: the loop measures the steady state.
			w.forward(msg, client, monotonicNow())
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				w.forward(msg, client, monotonicNow())
			}
			b.StopTimer()
			st, _ := svc.UDPStats()
			if st.DatagramsToBackend != uint64(b.N)+1 {
				b.Fatalf("%d datagrams forwarded, want %d; drops %v", st.DatagramsToBackend, b.N+1, st.Drops)
			}
		})
	}
}

// BenchmarkUDPRoundTrip measures one datagram client → l4lb → echo backend
// → l4lb → client, both directions through real sockets.
func BenchmarkUDPRoundTrip(b *testing.B) {
	for _, size := range []int{64, 1200} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			cfg := udpConfig(startUDPEcho(b, "a"))
			cfg.Workers = 1
			startUDPService(b, cfg)
			c := newUDPClient(b, cfg.Listen)
			msg := bytes.Repeat([]byte{'x'}, size)
			buf := make([]byte, udpBufSize)
			c.conn.SetReadDeadline(time.Now().Add(time.Minute))
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := c.conn.WriteToUDPAddrPort(msg, cfg.Listen); err != nil {
					b.Fatal(err)
				}
				if _, _, err := c.conn.ReadFromUDPAddrPort(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestUDPBatchOrder sends bursts from several clients at once, so that the
// worker reads them in shared recvmmsg batches and the backend's replies
// come back in batches too: each flow's datagrams must keep their order
// both ways, whatever the interleaving of flows within a batch.
func TestUDPBatchOrder(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"), startUDPEcho(t, "b"))
	cfg.Workers = 1
	svc, _ := startUDPService(t, cfg)
	const clients, burst, rounds = 4, 24, 5
	cs := make([]*udpClient, clients)
	for i := range cs {
		cs[i] = newUDPClient(t, cfg.Listen)
	}
	buf := make([]byte, udpBufSize)
	for r := range rounds {
		for k := range burst {
			for i, c := range cs {
				msg := fmt.Sprintf("c%d-%04d", i, r*burst+k)
				if _, err := c.conn.WriteToUDPAddrPort([]byte(msg), cfg.Listen); err != nil {
					t.Fatal(err)
				}
			}
		}
		for i, c := range cs {
			c.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			last := -1
			for k := range burst {
				n, from, err := c.conn.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("client %d: reply %d of round %d: %v", i, k, r, err)
				}
				if from != cfg.Listen {
					t.Fatalf("reply from %s, want %s", from, cfg.Listen)
				}
				_, body, _ := strings.Cut(string(buf[:n]), ":")
				var ci, seq int
				if _, err := fmt.Sscanf(body, "c%d-%d", &ci, &seq); err != nil || ci != i {
					t.Fatalf("client %d got %q", i, buf[:n])
				}
				if seq <= last {
					t.Fatalf("client %d: %d after %d: reordered", i, seq, last)
				}
				last = seq
			}
		}
	}
	// A reader counts a batch once sendmmsg returns, which may be after
	// the client has read it.
	want := uint64(clients * burst * rounds)
	waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool {
		return st.DatagramsToBackend == want && st.DatagramsToClient == want
	})
}

// BenchmarkUDPForwardBatch measures the worker's path for one recvmmsg
// batch of udpBatch datagrams from 8 clients, interleaved: flow lookups,
// grouping by flow, one sendmmsg per flow, counters. Per datagram, to
// compare with BenchmarkUDPForward.
func BenchmarkUDPForwardBatch(b *testing.B) {
	for _, size := range []int{64, 1200} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			cfg := udpConfig(startUDPSink(b))
			cfg.Workers = 1
			svc, p := newUDPService(b, cfg)
			w := p.workers[0]
			// Fill the batch as recvmmsg would: 8 clients in turn.
			for i := range udpBatch {
				w.in.SetAddr(i, netip.AddrPortFrom(loopback, uint16(40000+i%8)))
				w.in.Lens[i] = size
			}
			w.forwardBatch(udpBatch, monotonicNow()) // open the flows
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += udpBatch {
				w.forwardBatch(min(udpBatch, b.N-i), monotonicNow())
			}
			b.StopTimer()
			st, _ := svc.UDPStats()
			if st.DatagramsToBackend != uint64(b.N)+udpBatch {
				b.Fatalf("%d datagrams forwarded, want %d; drops %v", st.DatagramsToBackend, b.N+udpBatch, st.Drops)
			}
		})
	}
}

// A flow closed by a backend drain frees its max_flows slot (and leaves
// udp_flows_active) when it closes, not when its client sends again or the
// timer wheel reaches its idle deadline, up to idle_timeout later: a new
// client must not be refused for max_flows with no flow open.
func TestUDPClosedFlowsFreeTheirSlot(t *testing.T) {
	a, b := startUDPEcho(t, "a"), startUDPEcho(t, "b")
	cfg := udpConfig(a, b)
	cfg.MaxFlows = 1
	cfg.DrainTimeout = 200 * time.Millisecond
	svc, _ := startUDPService(t, cfg)
	first := newUDPClient(t, cfg.Listen)
	name := first.exchange("first")
	next := *cfg
	if name == "a" {
		next.Backends = cfg.Backends[1:]
	} else {
		next.Backends = cfg.Backends[:1]
	}
	svc.Update(&next) // first's backend leaves: its flow drains for 200 ms, then is closed
	time.Sleep(next.DrainTimeout + 500*time.Millisecond)

	st, _ := svc.UDPStats()
	if st.FlowsActive != 0 {
		t.Errorf("udp_flows_active = %d after the drain closed the only flow; want 0", st.FlowsActive)
	}
	if _, err := newUDPClient(t, cfg.Listen).tryExchange("second", time.Second); err != nil {
		st, _ := svc.UDPStats()
		t.Fatalf("new client refused with no flow open (max_flows = 1): %v; stats %+v", err, st)
	}
}

// A flow that picked a backend from the route before a reload set its
// weight to 0, when the backend had no flow as the reload looked, must not
// escape every drain: no drain timer starts (nothing was open), connect's
// refusesNew check can run before setRefuseNew (the Maglev build sits
// between them), so the reload closes such flows itself. (A removed
// backend has the same window around retireIfIdle, which sees only TCP
// connections.)
func TestUDPFlowPickedDuringWeightZeroReloadCloses(t *testing.T) {
	a, b := startUDPEcho(t, "a"), startUDPEcho(t, "b")
	for trial := range 4 {
		cfg := udpConfig(a, b)
		cfg.MaxFlows = 100000
		cfg.DrainTimeout = 100 * time.Millisecond
		cfg.Backends[0].Weight = 0 // a starts with no flows
		svc, p := startUDPService(t, cfg)
		const n = 1500
		clients := make([]*net.UDPConn, n)
		for i := range clients {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
			if err != nil {
				t.Fatal(err)
			}
			clients[i] = c
		}
		up, zero := *cfg, *cfg
		up.Backends = []config.Backend{{Address: a, Weight: 100}, {Address: b, Weight: 100}}
		zero.Backends = []config.Backend{{Address: a, Weight: 0}, {Address: b, Weight: 100}}
		start := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			<-start
			for _, c := range clients {
				c.WriteToUDPAddrPort([]byte("x"), cfg.Listen)
			}
		}()
		close(start)
		time.Sleep(200 * time.Microsecond)
		svc.Update(&up)   // a in the route
		svc.Update(&zero) // a at weight 0: its flows drain for 100 ms
		<-done
		time.Sleep(cfg.DrainTimeout + 400*time.Millisecond)
		be := backendOf(svc, a)
		var open int
		be.udp.mu.Lock()
		for f := be.udp.flows; f != nil; f = f.beNext {
			if !f.closed.Load() {
				open++
			}
		}
		be.udp.mu.Unlock()
		for _, c := range clients {
			c.Close()
		}
		p.Close()
		if open > 0 {
			t.Fatalf("trial %d: %d flows to a still open %v after it went to weight 0 (drain_timeout %v)",
				trial, open, cfg.DrainTimeout+400*time.Millisecond, cfg.DrainTimeout)
		}
	}
}

// A backend that dies (host up, port closed) and leaves the route does not
// keep its flows, even with on_down = "keep" and a client that keeps
// sending within idle_timeout: the port unreachable ends the flow, and the
// client's next datagram goes to the backend still up, as nginx ends the
// session on the upstream's ECONNREFUSED.
func TestUDPFlowLeavesBackendGone(t *testing.T) {
	echoA := newUDPEcho(t, "a")
	a, stopA := echoA.addr, echoA.stop
	b := startUDPEcho(t, "b")
	cfg := udpConfig(a, b)
	cfg.IdleTimeout = 500 * time.Millisecond
	cfg.Health = config.Health{Kind: config.HealthSendExpect, Interval: 50 * time.Millisecond,
		Timeout: 40 * time.Millisecond, Rise: 1, Fall: 2, Send: "ping", ExpectRegex: "^[ab]:ping$"}
	cfg.OnDown = config.OnDownKeep
	cfg.PanicMode = config.PanicNone
	svc, _ := startUDPService(t, cfg)
	eventually(t, "both backends up", func() bool { return len(routed(svc)) == 2 })

	var onA *udpClient
	for range 64 {
		c := newUDPClient(t, cfg.Listen)
		if c.exchange("which") == "a" {
			onA = c
			break
		}
	}
	if onA == nil {
		t.Fatal("no client reached a")
	}
	stopA()
	eventually(t, "a marked down", func() bool { return len(routed(svc)) == 1 })

	// The client keeps asking, well within idle_timeout, for 4 idle_timeouts.
	deadline := time.Now().Add(4 * cfg.IdleTimeout)
	for time.Now().Before(deadline) {
		if got, err := onA.tryExchange("retry", 100*time.Millisecond); err == nil {
			t.Logf("client served by %s after a went down", got)
			return
		}
	}
	st, _ := svc.UDPStats()
	t.Fatalf("client black-holed on dead backend a for %v (4 × idle_timeout) while b is up; stats %+v", 4*cfg.IdleTimeout, st)
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// sendICMPUnreach sends, over loopback, an ICMP destination unreachable
// (code) about a UDP datagram from src to dst, as a router or the backend
// host would. Needs CAP_NET_RAW.
func sendICMPUnreach(t *testing.T, code byte, mtu uint16, src, dst netip.AddrPort) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_ICMP)
	if err != nil {
		t.Fatalf("raw socket (needs CAP_NET_RAW, as make test has as root): %v", err)
	}
	defer syscall.Close(fd)
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	ip := []byte{0x45, 0, 0, 28 + 100, 0, 0, 0x40, 0, 64, 17, 0, 0,
		s4[0], s4[1], s4[2], s4[3], d4[0], d4[1], d4[2], d4[3]}
	udp := []byte{byte(src.Port() >> 8), byte(src.Port()), byte(dst.Port() >> 8), byte(dst.Port()), 0, 108, 0, 0}
	msg := append([]byte{3, code, 0, 0, 0, 0, byte(mtu >> 8), byte(mtu)}, append(ip, udp...)...)
	cs := icmpChecksum(msg)
	msg[2], msg[3] = byte(cs>>8), byte(cs)
	if err := syscall.Sendto(fd, msg, 0, &syscall.SockaddrInet4{Addr: s4}); err != nil {
		t.Fatal(err)
	}
}

// A client's datagrams that a worker reads in one batch reach the backend
// as one segmented send (UDP GSO), cut into the datagrams they were: a
// backend socket that takes such sends whole (UDP_GRO) sees one packet of
// four 50-byte segments.
func TestUDPFlowSendsABatchAsOnePacket(t *testing.T) {
	for _, tc := range []struct {
		gso  string
		want string
	}{
		{"", "200 bytes in segments of 50"},
		{"off", "50 bytes in segments of 0"}, // one datagram at a time
	} {
		t.Run("L4LB_UDP_GSO="+tc.gso, func(t *testing.T) {
			t.Setenv("L4LB_UDP_GSO", tc.gso)
			if got := firstBackendRead(t); got != tc.want {
				t.Errorf("the backend's first read: %s, want %s", got, tc.want)
			}
		})
	}
}

// firstBackendRead queues four 50-byte datagrams of one client for a
// one-worker service, starts it, and says how the backend's first read
// came, as "N bytes in segments of S" (S = 0: not segmented).
func firstBackendRead(t *testing.T) string {
	be, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	rc, _ := be.SyscallConn()
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1) })
	if err != nil {
		t.Fatalf("UDP_GRO: %v", err)
	}
	cfg := udpConfig(be.LocalAddr().(*net.UDPAddr).AddrPort())
	cfg.Workers = 1
	_, p := newUDPService(t, cfg)
	// Queued before the worker runs, so that its first read takes all four.
	client := newUDPClient(t, cfg.Listen)
	for i := range 4 {
		if _, err := client.conn.WriteToUDPAddrPort(bytes.Repeat([]byte{byte('a' + i)}, 50), cfg.Listen); err != nil {
			t.Fatal(err)
		}
	}
	p.start()
	buf, oob := make([]byte, 1<<16), make([]byte, 64)
	be.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, oobn, _, _, err := be.ReadMsgUDPAddrPort(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	segment := 0
	msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_UDP && m.Header.Type == unix.UDP_GRO {
			segment = int(binary.NativeEndian.Uint32(m.Data))
		}
	}
	for i := 0; i*50 < n; i++ {
		if buf[i*50] != byte('a'+i) {
			t.Errorf("datagram %d of the read starts with %q, want %q", i, buf[i*50], byte('a'+i))
		}
	}
	return fmt.Sprintf("%d bytes in segments of %d", n, segment)
}

// A batch of a client's datagrams larger than the path MTU to the backend
// (learned from an ICMP fragmentation needed) reaches the backend whole,
// fragmented as single datagrams are: the kernel refuses to segment them
// (EMSGSIZE), and SendOne took that for each datagram's error, so that
// udpSend dropped all but the last of the run.
func TestUDPFlowSendsABatchAboveThePathMTU(t *testing.T) {
	// The kernel keeps the MTU it learns for 10 minutes: an address of this
	// test's own, as in TestUDPFragmentationNeededKeepsFlow.
	echo := newUDPEchoOn(t, "a", netip.MustParseAddr("127.0.0.94"))
	probe, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(echo.addr))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	sendICMPUnreach(t, 4, 1200, probe.LocalAddr().(*net.UDPAddr).AddrPort(), echo.addr)
	probe.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := probe.Read(make([]byte, 1)); !errors.Is(err, syscall.EMSGSIZE) {
		t.Fatalf("the probe's pending error is %v, want EMSGSIZE: no MTU learned", err)
	}
	cfg := udpConfig(echo.addr)
	cfg.Workers = 1
	svc, p := newUDPService(t, cfg)
	// Queued before the worker runs, so that its first read takes all four.
	client := newUDPClient(t, cfg.Listen)
	for range 4 {
		if _, err := client.conn.WriteToUDPAddrPort(bytes.Repeat([]byte("x"), 1300), cfg.Listen); err != nil {
			t.Fatal(err)
		}
	}
	p.start()
	for i := range 4 {
		select {
		case <-echo.peers:
		case <-time.After(2 * time.Second):
			st, _ := svc.UDPStats()
			t.Fatalf("the backend got %d of 4 datagrams; stats %+v", i, st)
		}
	}
}

// ICMP fragmentation needed (a router on a lower-MTU path to the backend)
// reaches the flow's socket as EMSGSIZE (IP_PMTUDISC_WANT is the default):
// the kernel has learned the path MTU and fragments from then on, so the
// flow goes on from the same local port. Ended, the client's next datagram
// would open a flow from a new port, and the backend would lose the
// session (DTLS, QUIC, WireGuard and game servers key sessions by
// 4-tuple).
func TestUDPFragmentationNeededKeepsFlow(t *testing.T) {
	for _, tc := range []struct {
		name string
		code byte
		mtu  uint16
	}{{"frag needed", 4, 1200}} {
		t.Run(tc.name, func(t *testing.T) {
			// The kernel keeps the MTU it learns for the backend's address
			// for 10 minutes (net.ipv4.route.mtu_expires): an address of
			// this test's own keeps it from fragmenting what later tests
			// and benchmarks send to 127.0.0.1.
			echo := newUDPEchoOn(t, "a", netip.MustParseAddr("127.0.0.93"))
			be, peers := echo.addr, echo.peers
			cfg := udpConfig(be)
			svc, _ := startUDPService(t, cfg)
			c := newUDPClient(t, cfg.Listen)
			c.exchange("one")
			p1 := <-peers
			sendICMPUnreach(t, tc.code, tc.mtu, p1, be)
			time.Sleep(200 * time.Millisecond)
			c.exchange("two")
			p2 := <-peers
			st, _ := svc.UDPStats()
			if p2 != p1 || st.FlowsClosed != 0 {
				t.Errorf("after one ICMP %s the backend sees the client from %s, was %s; stats %+v", tc.name, p2, p1, st)
			}
		})
	}
}

// A host out of descriptors, or of local UDP ports, cannot open a flow to
// any backend: the flow is dropped after one attempt, and no backend is
// counted as failing for it.
func TestUDPLocalShortageBlamesNoBackend(t *testing.T) {
	for _, shortageErr := range []error{
		os.NewSyscallError("socket", syscall.EMFILE),
		os.NewSyscallError("connect", syscall.EAGAIN), // no free local port
	} {
		t.Run(shortageErr.Error(), func(t *testing.T) {
			cfg := udpConfig(startUDPEcho(t, "a"), startUDPEcho(t, "b"))
			cfg.Workers = 1
			svc, p := newUDPService(t, cfg)
			var dials atomic.Int32
			var shortage atomic.Bool
			shortage.Store(true)
			p.dial = func(backend netip.AddrPort) (*os.File, error) {
				dials.Add(1)
				if shortage.Load() {
					return nil, &net.OpError{Op: "dial", Net: "udp", Err: shortageErr}
				}
				return dialUDP(backend)
			}
			p.start()
			client := newUDPClient(t, cfg.Listen)
			if _, err := client.tryExchange("x", 200*time.Millisecond); err == nil {
				t.Fatal("reply while no socket could be opened")
			}
			if n := dials.Load(); n != 1 {
				t.Errorf("%d sockets tried; want 1 (the next backend would fail alike)", n)
			}
			for _, be := range cfg.Backends {
				if n := backendOf(svc, be.Address).dialFailed.Load(); n != 0 {
					t.Errorf("backend %v: %d connect failures counted for this host's shortage", be.Address, n)
				}
			}
			if st, _ := svc.UDPStats(); st.Drops[DropBackendSocket] != 1 {
				t.Errorf("drops %v; want 1 backend_socket", st.Drops)
			}
			shortage.Store(false)
			if _, err := client.tryExchange("y", 2*time.Second); err != nil {
				t.Fatalf("no flow once sockets open again: %v", err)
			}
		})
	}
}

// A client's first datagram that picks a backend while a reload retires it
// is not lost: the flow picks again from the reload's route.
func TestUDPFlowPickedDuringRetireRepicks(t *testing.T) {
	a, b := startUDPEcho(t, "a"), startUDPEcho(t, "b")
	cfg := udpConfig(a)
	cfg.Workers = 1
	svc, p := newUDPService(t, cfg)
	onlyB := *cfg
	onlyB.Backends = []config.Backend{{Address: b, Weight: 100}}
	var reloaded atomic.Bool
	p.dial = func(backend netip.AddrPort) (*os.File, error) {
		if backend == a && reloaded.CompareAndSwap(false, true) {
			// The reload lands between the pick and the socket.
			svc.Update(&onlyB)
		}
		return dialUDP(backend)
	}
	p.start()
	reply, err := newUDPClient(t, cfg.Listen).tryExchange("x", 2*time.Second)
	if err != nil {
		t.Fatalf("first datagram lost to a reload that retired its backend: %v", err)
	}
	if reply != "b" {
		t.Errorf("reply from %q; want b, the reload's backend", reply)
	}
	if !reloaded.Load() {
		t.Fatal("the reload did not run between pick and socket")
	}
	st, _ := svc.UDPStats()
	if st.FlowsCreated != 1 || st.Drops != [NumDropReasons]uint64{} {
		t.Errorf("flows created %d, drops %v; want 1 flow, no drops", st.FlowsCreated, st.Drops)
	}
	if n := backendOf(svc, b).total.Load(); n != 1 {
		t.Errorf("backend b: %d flows; want 1", n)
	}
}

// With replies_per_datagram, a flow ends as soon as its backend has
// answered every datagram, freeing its socket and its max_flows slot, and
// the client's next datagram opens a new flow: DNS clients, each query from
// a new port, would otherwise hold a socket each until idle_timeout.
func TestUDPRepliesPerDatagramEndsAnsweredFlows(t *testing.T) {
	echo := newUDPEcho(t, "a")
	cfg := udpConfig(echo.addr)
	cfg.RepliesPerDatagram = 1
	cfg.MaxFlows = 1 // a flow left open would refuse the next one
	svc, _ := startUDPService(t, cfg)
	c := newUDPClient(t, cfg.Listen)
	c.exchange("q1")
	first := <-echo.peers
	waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool { return st.FlowsAnswered == 1 && st.FlowsActive == 0 })
	c.exchange("q2")
	if second := <-echo.peers; second == first {
		t.Errorf("second query came from the first flow's socket %v; want a new flow", first)
	}
	waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool { return st.FlowsAnswered == 2 && st.FlowsActive == 0 })
	st, _ := svc.UDPStats()
	if st.FlowsCreated != 2 || st.FlowsExpired != 0 || st.FlowsClosed != 0 || st.Drops != [NumDropReasons]uint64{} {
		t.Errorf("stats %+v; want 2 flows created and answered, none expired, closed or dropped", st)
	}
}

// Datagrams that a client sends while its flow's last reply is on its way
// are not lost to the flow ending: each is answered, on the old flow or a
// new one.
func TestUDPRepliesPerDatagramPipelined(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"), startUDPEcho(t, "b"))
	cfg.RepliesPerDatagram = 1
	svc, _ := startUDPService(t, cfg)
	const clients, rounds = 20, 60
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for range clients {
		c := newUDPClient(t, cfg.Listen)
		wg.Go(func() {
			buf := make([]byte, 64)
			for round := range rounds {
				// One datagram at a time, whose reply ends the flow just
				// as the next comes, and bursts, which one flow answers.
				burst := 1 + round%3
				for i := range burst {
					if _, err := c.conn.WriteToUDPAddrPort(fmt.Appendf(nil, "%d.%d", round, i), cfg.Listen); err != nil {
						errs <- err
						return
					}
				}
				for i := range burst {
					c.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
					if _, _, err := c.conn.ReadFromUDPAddrPort(buf); err != nil {
						errs <- fmt.Errorf("client %v round %d: reply %d of %d: %w", c.addr(), round, i+1, burst, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	const datagrams = clients * rounds * 2 // bursts of 1, 2 and 3
	// Readers count replies after their sendmmsg returns, which may be
	// after the client has read them.
	st := waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool { return st.DatagramsToClient >= datagrams })
	if st.Drops != [NumDropReasons]uint64{} {
		t.Errorf("drops %v; want none", st.Drops)
	}
	if st.FlowsAnswered == 0 || st.DatagramsToClient != datagrams {
		t.Errorf("%d flows answered, %d replies; want some answered, %d replies", st.FlowsAnswered, st.DatagramsToClient, datagrams)
	}
	t.Logf("%d flows created, %d answered for %d datagrams", st.FlowsCreated, st.FlowsAnswered, datagrams)
}
