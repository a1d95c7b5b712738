package l4

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
)

// slowBackend is a loopback listener whose accept queue is full, so that
// a connect to it hangs (the kernel drops the SYN and the client retries
// after about a second) until release empties the queue.
type slowBackend struct {
	addr netip.AddrPort
	ln   net.Listener
}

func newSlowBackend(t *testing.T) *slowBackend {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	// A backlog of 0 holds one connection; every SYN after it is dropped.
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "slow backend")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	b := &slowBackend{addr: ln.Addr().(*net.TCPAddr).AddrPort(), ln: ln}
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", b.addr.String(), 200*time.Millisecond)
		if err != nil {
			break // the queue is full
		}
		t.Cleanup(func() { c.Close() })
		if i == 5 {
			t.Fatal("the accept queue of a backlog-0 listener never filled")
		}
	}
	return b
}

// release accepts everything queued and from now on, so hanging connects
// complete at their next SYN retry.
func (b *slowBackend) release(t *testing.T) {
	go func() {
		for {
			c, err := b.ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
}

// TestRemovedMidDialIsDrained removes a backend while a connection to it is
// still being dialed. The connection must count as the backend's, so the
// backend drains instead of being forgotten, and when the dial completes
// after the drain deadline the connection starts over on the current
// route instead of living on outside every drain.
func TestRemovedMidDialIsDrained(t *testing.T) {
	// Removed from the config, or kept with weight 0: either way its drain
	// must reach the connection.
	for _, weightZero := range []bool{false, true} {
		name := map[bool]string{false: "removed", true: "weight 0"}[weightZero]
		t.Run(name, func(t *testing.T) { testMidDialDrained(t, weightZero) })
	}
}

func testMidDialDrained(t *testing.T, weightZero bool) {
	slow := newSlowBackend(t)
	other := startEcho(t)
	addr, svc := startService(t, time.Hour, slow.addr)
	cfg := *svc.route.Load().cfg
	cfg.ConnectTimeout = 10 * time.Second
	svc.Update(&cfg)

	client, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	be := backendOf(svc, slow.addr)
	eventually(t, "the dial to the slow backend counted as active", func() bool { return be.active.Load() == 1 })

	changed := cfg
	changed.DrainTimeout = 200 * time.Millisecond
	changed.Backends = []config.Backend{{Address: other, Weight: 1}}
	if weightZero {
		changed.Backends = append(changed.Backends, config.Backend{Address: slow.addr, Weight: 0})
	}
	svc.Update(&changed)
	svc.mu.Lock()
	draining := be.drainTimer != nil
	svc.mu.Unlock()
	if !draining {
		t.Fatalf("a backend %s while a connection to it was dialing does not drain", map[bool]string{false: "removed", true: "set to weight 0"}[weightZero])
	}
	eventually(t, "the drain deadline passed", func() bool { return be.refusesNew() })

	slow.release(t)
	client.SetDeadline(time.Now().Add(8 * time.Second))
	roundTrip(t, client, "on the backend that stayed")
	if n := be.active.Load(); n != 0 {
		t.Errorf("drained backend still counts %d connections", n)
	}
	if n := backendOf(svc, other).active.Load(); n != 1 {
		t.Errorf("the backend that stayed counts %d connections, want 1", n)
	}
}

// TestDrainCutsConnectionsReadingTheirProxyHeader drains a service (as a
// removal or shutdown does) while two clients of a trusted balancer are
// still sending their PROXY headers: one sends the rest of its header
// only after the drain's deadline, the other never does. Drain must cut
// both at its deadline, not wait for proxy_protocol_timeout, and neither
// may reach the backend.
func TestDrainCutsConnectionsReadingTheirProxyHeader(t *testing.T) {
	var backendConns atomic.Int32
	backend := startBackend(t, func(c net.Conn) { backendConns.Add(1); echo(c) })
	cfg := &config.Service{Backends: []config.Backend{{Address: backend, Weight: 1}}}
	cfg.AcceptProxyProtocol = true
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	cfg.ProxyProtocolTimeout = 10 * time.Second
	addr, svc := startProtectedService(t, cfg)
	late, stuck := dialT(t, addr), dialT(t, addr)
	late.Write([]byte("PROXY TCP4 192.0.2.1 "))
	stuck.Write([]byte("PROXY TCP4 "))
	eventually(t, "both clients accepted", func() bool { return svc.accepted.Load() == 2 })

	start := time.Now()
	var cut int64
	drained := make(chan struct{})
	go func() { cut = svc.Drain(start); close(drained) }() // drain_timeout = 0s
	time.Sleep(200 * time.Millisecond)
	late.Write([]byte("192.0.2.2 1 2\r\n")) // the rest of the header, after the deadline
	<-drained
	if d := time.Since(start); d > time.Second {
		t.Errorf("Drain with a deadline of now returned after %v (proxy_protocol_timeout is %v)", d.Round(time.Millisecond), cfg.ProxyProtocolTimeout)
	}
	if cut != 2 {
		t.Errorf("Drain cut %d connections, want the 2 reading their headers", cut)
	}
	expectClosed(t, late)
	expectClosed(t, stuck)
	if n := backendConns.Load(); n != 0 {
		t.Errorf("the backend got %d connection(s) after the service's drain deadline", n)
	}
}

// TestHeaderAfterDrainDeadlineDialsNothing completes a PROXY header once
// the service's drain deadline has passed, before the drain's abort
// reaches the connection (both can come in one round of its loop): the
// client is closed, and the backend never sees a connection.
func TestHeaderAfterDrainDeadlineDialsNothing(t *testing.T) {
	var backendConns atomic.Int32
	backend := startBackend(t, func(c net.Conn) { backendConns.Add(1); echo(c) })
	cfg := &config.Service{Backends: []config.Backend{{Address: backend, Weight: 1}}}
	cfg.AcceptProxyProtocol = true
	cfg.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	cfg.ProxyProtocolTimeout = 10 * time.Second
	addr, svc := startProtectedService(t, cfg)
	c := dialT(t, addr)
	eventually(t, "the client accepted", func() bool { return svc.accepted.Load() == 1 })
	svc.cut.Store(true) // what Drain does at its deadline, before it aborts
	c.Write([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello"))
	expectClosed(t, c)
	if n := backendConns.Load(); n != 0 {
		t.Errorf("the backend got %d connection(s) after the service's drain deadline", n)
	}
}

// TestShutdownWaitsForRemovedServices removes a service with a connection
// open, then shuts down: Shutdown must not return while that connection
// drains, since the process exits right after it.
func TestShutdownWaitsForRemovedServices(t *testing.T) {
	echo := startEcho(t)
	// Addresses of this test's own in 127/8, so no other test or
	// ephemeral port can hold them.
	var removedListen, keptListen = ownAddr("127.88.1.1:7000"), ownAddr("127.88.1.2:7000")
	parse := func(withRemoved bool) *config.Config {
		var s string
		if withRemoved {
			s = fmt.Sprintf("[services.removed]\nlisten = %q\ndrain_timeout = \"1s\"\n[[services.removed.backends]]\naddress = %q\n", removedListen, echo)
		}
		s += fmt.Sprintf("[services.kept]\nlisten = %q\ndrain_timeout = \"1s\"\n[[services.kept.backends]]\naddress = %q\n", keptListen, echo)
		cfg, err := config.Parse([]byte(s), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	srv := NewServer(hclog.NewNullLogger())
	if _, err := srv.Apply(context.Background(), parse(true)); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", removedListen)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "before the reload")
	if _, err := srv.Apply(context.Background(), parse(false)); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, c, "draining")
	srv.Shutdown()
	// The drain deadline has passed by now, so l4lb has closed the
	// connection: the read ends at once (the deadline only bounds a
	// failing test; the drain itself ends 1 s after the reload).
	c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Shutdown returned while a removed service's connection was still open (read: %v)", err)
	}
}

// TestUDPServiceBackWhileDraining removes a UDP service with a flow open and
// brings it back before its drain ends. Its sockets are still bound (the
// flow's replies leave by them), so the service must take them back:
// binding fresh ones would add them to the same SO_REUSEPORT group, and
// the clients the kernel hashes to the draining sockets would be refused.
func TestUDPServiceBackWhileDraining(t *testing.T) {
	echo := startUDPEcho(t, "echo")
	// Addresses of this test's own in 127/8, so no other test or
	// ephemeral port can hold them.
	var udpListen, tcpListen = ownAddr("127.88.2.1:7777"), ownAddr("127.88.2.2:7777")
	parse := func(withUDP bool) *config.Config {
		// A TCP service keeps the config valid while the UDP one is out.
		s := fmt.Sprintf("[services.tcp]\nlisten = %q\n[[services.tcp.backends]]\naddress = %q\n", tcpListen, echo)
		if withUDP {
			s += fmt.Sprintf("[services.game]\nlisten = %q\nprotocol = \"udp\"\nworkers = 2\ndrain_timeout = \"3s\"\n[[services.game.backends]]\naddress = %q\n", udpListen, echo)
		}
		cfg, err := config.Parse([]byte(s), "test.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	srv := NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	if _, err := srv.Apply(context.Background(), parse(true)); err != nil {
		t.Fatal(err)
	}
	listen := netip.MustParseAddrPort(udpListen)
	old := newUDPClient(t, listen)
	old.exchange("before the reloads")
	if _, err := srv.Apply(context.Background(), parse(false)); err != nil {
		t.Fatal(err)
	}
	old.exchange("while the service drains")
	if _, err := srv.Apply(context.Background(), parse(true)); err != nil {
		t.Fatal(err)
	}
	old.exchange("after it came back")
	// New clients land on either socket of the group; every one is served.
	for i := range 20 {
		if _, err := newUDPClient(t, listen).tryExchange(fmt.Sprintf("new client %d", i), 2*time.Second); err != nil {
			t.Fatalf("new client %d after the service came back: %v", i, err)
		}
	}
	var game *Service
	for _, rs := range srv.running {
		if rs.cfg.Name == "game" {
			game = rs.svc
		}
	}
	st, _ := game.UDPStats()
	if st.Drops[DropDraining] != 0 {
		t.Errorf("%d datagrams dropped as draining after the service came back", st.Drops[DropDraining])
	}
}

// Shutdown says what it waits for, and what it had to cut at the drain
// deadline: an operator watching a stop that takes drain_timeout sees why.
func TestShutdownSaysWhatItDrains(t *testing.T) {
	echo := startEcho(t)
	// An address of this test's own in 127/8: no other test holds it.
	var listen = ownAddr("127.88.4.1:7000")
	srv, logs := loggedServer(t, fmt.Sprintf("[services.db]\nlisten = %q\ndrain_timeout = \"300ms\"\n[[services.db.backends]]\naddress = %q\n", listen, echo))
	c, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "open and idle")
	srv.Shutdown()
	wantLog(t, logs,
		"draining before exit: service=db connections=1 flows=0 drain_timeout=300ms",
		"drain_timeout passed: closed what was still open: service=db connections=1 flows=0")
}

// A UDP flow counts once in the exit's log line, as a flow.
func TestShutdownCountsUDPFlowsOnce(t *testing.T) {
	echo := startUDPEcho(t, "echo")
	// An address of this test's own in 127/8: no other test holds it.
	var listen = ownAddr("127.88.9.3:7000")
	srv, logs := loggedServer(t, fmt.Sprintf("[services.dns]\nlisten = %q\nprotocol = \"udp\"\nworkers = 1\ndrain_timeout = \"200ms\"\n[services.dns.health]\nkind = \"none\"\n[[services.dns.backends]]\naddress = %q\n", listen, echo))
	newUDPClient(t, netip.MustParseAddrPort(listen)).exchange("one flow")
	srv.Shutdown()
	wantLog(t, logs,
		"draining before exit: service=dns connections=0 flows=1",
		"drain_timeout passed: closed what was still open: service=dns connections=0 flows=1")
}

// loggedServer runs the config text on a Server whose log it returns.
func loggedServer(t *testing.T, text string) (*Server, *lockedBuffer) {
	t.Helper()
	cfg, err := config.Parse([]byte(text), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	logs := new(lockedBuffer)
	srv := NewServer(hclog.New(&hclog.LoggerOptions{Output: logs}))
	if _, err := srv.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	return srv, logs
}

// wantLog fails t for each line of want that logs lacks within a few
// seconds.
func wantLog(t *testing.T, logs *lockedBuffer, want ...string) {
	t.Helper()
	// A line may follow the effect the test saw by a moment (a failback
	// closes the backups' connections, then counts them in its line):
	// each has a few seconds to come.
	deadline := time.Now().Add(5 * time.Second)
	for _, w := range want {
		for !strings.Contains(logs.String(), w) && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if !strings.Contains(logs.String(), w) {
			t.Errorf("no %q in the log:\n%s", w, logs.String())
		}
	}
}
