package l4

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
)

// listeningSockets counts the TCP sockets in LISTEN on port, whatever
// process or descriptor holds them.
func listeningSockets(t *testing.T, port uint16) int {
	t.Helper()
	n := 0
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 4 || fields[3] != "0A" {
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			if p, err := strconv.ParseUint(hexPort, 16, 16); err == nil && uint16(p) == port {
				n++
			}
		}
		f.Close()
	}
	return n
}

func parseConfig(t *testing.T, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(text), "handover.toml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestUpgradeTakesOverTCPSockets passes a running server's listening
// sockets to a second server, as an upgrade passes them to the new
// process: the second serves from the same sockets (no new socket
// listens), the first drains its open connection while clients keep
// connecting, and its stop leaves the sockets listening.
func TestUpgradeTakesOverTCPSockets(t *testing.T) {
	echo, listen := startEcho(t), freeLoopbackPort(t)
	cfg := parseConfig(t, fmt.Sprintf(`
[services.pg]
listen = %q
workers = 2
drain_timeout = "10s"
[[services.pg.backends]]
address = %q
`, listen, echo))
	old := NewServer(hclog.NewNullLogger())
	t.Cleanup(old.Shutdown)
	if _, err := old.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	open, err := net.Dial("tcp", listen.String())
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	roundTrip(t, open, "before the upgrade")

	socks, err := old.ListenSockets()
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 {
		t.Fatalf("%d listening sockets passed on, want the service's 2: %v", len(socks), socks)
	}
	for _, s := range socks {
		got, err := InheritedSocket(s.FD)
		if err != nil || got.Protocol != config.TCP || got.Listen != listen {
			t.Fatalf("InheritedSocket(%d) = %+v, %v; want tcp %s", s.FD, got, err, listen)
		}
	}
	successor := NewServer(hclog.NewNullLogger())
	t.Cleanup(successor.Shutdown)
	successor.Adopt(socks)
	if _, err := successor.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if n := listeningSockets(t, listen.Port()); n != 2 {
		t.Fatalf("%d sockets listen on port %d after the successor started, want the same 2", n, listen.Port())
	}

	stopped := make(chan struct{})
	go func() {
		old.HandOver(nil)
		old.Shutdown()
		close(stopped)
	}()
	for i := range 50 {
		c, err := net.Dial("tcp", listen.String())
		if err != nil {
			t.Fatalf("connection %d during the old server's drain: %v", i, err)
		}
		roundTrip(t, c, fmt.Sprintf("during the drain %d", i))
		c.Close()
	}
	roundTrip(t, open, "its connection still served by the old server")
	select {
	case <-stopped:
		t.Fatal("the old server stopped while its connection was open")
	default:
	}
	open.Close()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the old server did not stop once its last connection closed")
	}
	if n := listeningSockets(t, listen.Port()); n != 2 {
		t.Fatalf("%d sockets listen on port %d after the old server stopped, want 2", n, listen.Port())
	}
	for i := range 50 {
		c, err := net.Dial("tcp", listen.String())
		if err != nil {
			t.Fatalf("connection %d after the old server stopped: %v", i, err)
		}
		roundTrip(t, c, fmt.Sprintf("after %d", i))
		c.Close()
	}
}

// TestUpgradeTakesOverUDPSockets passes a UDP service's sockets to a
// second server: after HandOver the first reads no more datagrams (the
// second answers every one), but a reply its flow still owed reaches the
// client; its flows then idle out and it stops, leaving the sockets to
// the second.
func TestUpgradeTakesOverUDPSockets(t *testing.T) {
	backend := udpResponder(t, loopback, func(_ netip.AddrPort, body []byte) []byte {
		return append([]byte("b:"), body...)
	})
	listen := freeLoopbackUDPPort(t)
	cfg := parseConfig(t, fmt.Sprintf(`
[services.game]
listen = %q
protocol = "udp"
workers = 2
idle_timeout = "1s"
drain_timeout = "10s"
  [services.game.health]
  kind = "none"
  [[services.game.backends]]
  address = %q
`, listen, backend))
	old := NewServer(hclog.NewNullLogger())
	t.Cleanup(old.Shutdown)
	if _, err := old.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	client := newUDPClient(t, listen)
	client.exchange("before the upgrade")

	socks, err := old.ListenSockets()
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 2 || socks[0].Protocol != config.UDP || socks[0].Listen != listen {
		t.Fatalf("listening sockets passed on: %+v; want the service's 2 UDP sockets on %s", socks, listen)
	}
	successor := NewServer(hclog.NewNullLogger())
	t.Cleanup(successor.Shutdown)
	successor.Adopt(socks)
	if _, err := successor.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}

	// The backend answers this one after the hand-over, to the old
	// server's flow.
	if _, err := client.conn.WriteToUDPAddrPort([]byte("slow reply"), listen); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the old server forwards it first
	oldStats, _ := old.Services()[0].UDPStats()
	old.HandOver(nil)
	stopped := make(chan struct{})
	go func() {
		old.Shutdown()
		close(stopped)
	}()
	buf := make([]byte, 2048)
	client.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := client.conn.ReadFromUDPAddrPort(buf)
	if err != nil || from != listen || string(buf[:n]) != "b:slow reply" {
		t.Fatalf("the reply owed by the old server's flow: %q from %s, %v", buf[:n], from, err)
	}
	for i := range 20 {
		c := client
		if i%2 == 1 {
			c = newUDPClient(t, listen) // a client the old server never saw
		}
		c.exchange(fmt.Sprintf("after the hand-over %d", i))
	}
	if s, _ := old.Services()[0].UDPStats(); s.DatagramsToBackend != oldStats.DatagramsToBackend {
		t.Errorf("the old server forwarded %d datagrams after the hand-over, want 0", s.DatagramsToBackend-oldStats.DatagramsToBackend)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the old server did not stop once its flows idled out (idle_timeout 1s)")
	}
	for i := range 10 {
		newUDPClient(t, listen).exchange(fmt.Sprintf("after the old server stopped %d", i))
	}
}

// TestUpgradeAdoptsWhatTheConfigWants gives a successor a config that
// differs from its predecessor's: a TCP service with more workers than
// sockets passed gets the difference bound beside them, one with fewer
// keeps every socket passed (each may hold queued clients), and the
// sockets of a service the config dropped close once the predecessor
// has stopped.
func TestUpgradeAdoptsWhatTheConfigWants(t *testing.T) {
	echo := startEcho(t)
	grow, shrink, dropped := freeLoopbackPort(t), freeLoopbackPort(t), freeLoopbackPort(t)
	service := func(name string, listen netip.AddrPort, workers int) string {
		return fmt.Sprintf("[services.%s]\nlisten = %q\nworkers = %d\n[[services.%s.backends]]\naddress = %q\n", name, listen, workers, name, echo)
	}
	old := NewServer(hclog.NewNullLogger())
	t.Cleanup(old.Shutdown)
	if _, err := old.Apply(context.Background(), parseConfig(t, service("grow", grow, 1)+service("shrink", shrink, 3)+service("dropped", dropped, 2))); err != nil {
		t.Fatal(err)
	}
	socks, err := old.ListenSockets()
	if err != nil {
		t.Fatal(err)
	}
	successor := NewServer(hclog.NewNullLogger())
	t.Cleanup(successor.Shutdown)
	successor.Adopt(socks)
	if _, err := successor.Apply(context.Background(), parseConfig(t, service("grow", grow, 2)+service("shrink", shrink, 1))); err != nil {
		t.Fatal(err)
	}
	old.HandOver(nil)
	old.Shutdown()
	for _, c := range []struct {
		listen netip.AddrPort
		want   int
	}{{grow, 2}, {shrink, 3}, {dropped, 0}} {
		if n := listeningSockets(t, c.listen.Port()); n != c.want {
			t.Errorf("%d sockets listen on %s after the hand-over, want %d", n, c.listen, c.want)
		}
	}
	for _, listen := range []netip.AddrPort{grow, shrink} {
		for i := range 20 {
			c, err := net.Dial("tcp", listen.String())
			if err != nil {
				t.Fatalf("connection %d to %s: %v", i, listen, err)
			}
			roundTrip(t, c, "served")
			c.Close()
		}
	}
}

// TestStoppedAcceptorServesItsQueue stops a listening socket's acceptor
// while clients wait in its queue, more than one round of accepts takes:
// each is taken and served before the socket closes, rather than reset
// by the kernel (or, with tcp_migrate_req, moved by it, which may fail
// for a handshake completing as the socket closes).
func TestStoppedAcceptorServesItsQueue(t *testing.T) {
	svc, lns := echoServiceOnOneSocket(t, "queued")
	const queued = 3 * acceptBatch
	var clients []net.Conn
	for range queued {
		c, err := net.Dial("tcp", lns[0].addr.String()) // the kernel completes it: nothing accepts yet
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	var running sync.WaitGroup
	acceptors := startAcceptors(loops(), svc, nil, lns, 0, &running)
	closeListeners(acceptors)
	running.Wait()
	for i, c := range clients {
		roundTrip(t, c, fmt.Sprintf("queued client %d", i))
	}
	c, err := net.Dial("tcp", lns[0].addr.String())
	if err == nil {
		c.Close()
		t.Error("the stopped acceptor's socket still takes connections")
	}
	for _, c := range clients {
		c.Close()
	}
	svc.Drain(time.Now().Add(5 * time.Second))
}

// An acceptor at a full gate (max_connections) holds one client while it
// waits for a slot; when its socket closes (a stop, workers lowered, an
// upgrade's hand-over) that client is served past the bound, not reset.
func TestStoppedAcceptorServesTheClientItHeld(t *testing.T) {
	svc, lns := echoServiceOnOneSocket(t, "held")
	gate := newConnGate(1)
	svc.gate = gate
	var running sync.WaitGroup
	acceptors := startAcceptors(loops(), svc, gate, lns, 0, &running)
	first, err := net.Dial("tcp", lns[0].addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	roundTrip(t, first, "the one slot")
	waiting, err := net.Dial("tcp", lns[0].addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer waiting.Close()
	// Held by the acceptor now, or taken with the queue as the socket
	// closes and held then: either way the one the gate turns away.
	closeListeners(acceptors)
	running.Wait()
	roundTrip(t, waiting, "held at the full gate, then the socket closed")
	first.Close()
	waiting.Close()
	svc.Drain(time.Now().Add(5 * time.Second))
}

// echoServiceOnOneSocket is a TCP service in front of an echo backend,
// with one loopback listening socket bound for it and no acceptor yet.
func echoServiceOnOneSocket(t *testing.T, name string) (*Service, []boundSocket) {
	t.Helper()
	cfg := &config.Service{
		Name: name, Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.RoundRobin, Workers: 1, ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: 10 * time.Second,
		Backends: []config.Backend{{Address: startEcho(t), Weight: 1}},
	}
	svc := NewService(cfg, hclog.NewNullLogger())
	lns, err := listenTCP(context.Background(), cfg.Listen, 1)
	if err != nil {
		t.Fatal(err)
	}
	return svc, lns
}
