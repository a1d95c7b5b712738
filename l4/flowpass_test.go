package l4

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

// peerReporter is a UDP backend that answers each datagram with
// "NAME PEER BODY": PEER is the address the datagram came from, which
// for a flow is the port its socket has. A body starting "slow" is
// answered 300 ms later.
func peerReporter(t *testing.T, name string) netip.AddrPort {
	t.Helper()
	return peerReporterOn(t, name, loopback)
}

// peerReporterOn is peerReporter on another loopback address.
func peerReporterOn(t *testing.T, name string, addr netip.Addr) netip.AddrPort {
	t.Helper()
	return udpResponder(t, addr, func(from netip.AddrPort, body []byte) []byte {
		return []byte(fmt.Sprintf("%s %s %s", name, from, body))
	})
}

// udpResponder is a UDP backend on addr that answers each datagram with
// reply(from, body), 300 ms late for a body starting "slow": a reply the
// old server's flow still owes when it hands over.
func udpResponder(t *testing.T, addr netip.Addr, reply func(from netip.AddrPort, body []byte) []byte) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			answer := reply(from, buf[:n])
			if strings.HasPrefix(string(buf[:n]), "slow") {
				time.AfterFunc(300*time.Millisecond, func() { c.WriteToUDPAddrPort(answer, from) })
				continue
			}
			c.WriteToUDPAddrPort(answer, from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// ask sends body from client to the service at to and returns the
// backend's name and the flow's port it saw.
func ask(t *testing.T, client *net.UDPConn, to netip.AddrPort, body string) (backend, peer string) {
	t.Helper()
	if _, err := client.WriteToUDPAddrPort([]byte(body), to); err != nil {
		t.Fatal(err)
	}
	return answer(t, client, body)
}

func answer(t *testing.T, client *net.UDPConn, body string) (backend, peer string) {
	t.Helper()
	buf := make([]byte, 2048)
	client.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _, err := client.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%s: no answer to %q: %v", client.LocalAddr(), body, err)
	}
	fields := strings.SplitN(string(buf[:n]), " ", 3)
	if len(fields) != 3 || fields[2] != body {
		t.Fatalf("answer %q to %q", buf[:n], body)
	}
	return fields[0], fields[1]
}

// flowSocketPair is the upgrade's socket between the two processes.
func flowSocketPair(t *testing.T) (old, successor *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "flows")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// udpService is the config text of a UDP service without health checks,
// so that its backends take flows from the first datagram. Zero fields
// leave l4lb's defaults.
type udpService struct {
	name         string // "game" when empty
	listen       netip.AddrPort
	workers      int
	idleTimeout  time.Duration
	drainTimeout time.Duration
	// spreadPorts hashes the client's port too: every client is on the
	// same loopback address, and would reach one backend.
	spreadPorts bool
	backends    []netip.AddrPort
}

func (s udpService) text() string {
	name := cmp.Or(s.name, "game")
	var b strings.Builder
	fmt.Fprintf(&b, "[services.%s]\nlisten = %q\nprotocol = \"udp\"\n", name, s.listen)
	if s.workers != 0 {
		fmt.Fprintf(&b, "workers = %d\n", s.workers)
	}
	if s.idleTimeout != 0 {
		fmt.Fprintf(&b, "idle_timeout = %q\n", s.idleTimeout)
	}
	if s.drainTimeout != 0 {
		fmt.Fprintf(&b, "drain_timeout = %q\n", s.drainTimeout)
	}
	if s.spreadPorts {
		b.WriteString("hash_key = \"source_ip_port\"\n")
	}
	fmt.Fprintf(&b, "[services.%s.health]\nkind = \"none\"\n", name)
	for _, backend := range s.backends {
		fmt.Fprintf(&b, "[[services.%s.backends]]\naddress = %q\n", name, backend)
	}
	return b.String()
}

func (s udpService) config(t *testing.T) *config.Config {
	t.Helper()
	return parseConfig(t, s.text())
}

// gameOnOneBackend is where a UDP service listens, on a free loopback
// port, and its config: over a peerReporter "b", with flows that idle out
// within a test's time, on workers sockets (0 for one per core).
func gameOnOneBackend(t *testing.T, workers int) (netip.AddrPort, *config.Config) {
	t.Helper()
	backend := peerReporter(t, "b")
	listen := freeLoopbackUDPPort(t)
	return listen, udpService{listen: listen, workers: workers, idleTimeout: time.Second, backends: []netip.AddrPort{backend}}.config(t)
}

// startOldServer is the server an upgrade replaces, serving cfg until
// cleanup.
func startOldServer(t *testing.T, cfg *config.Config) *Server {
	t.Helper()
	old := NewServer(hclog.NewNullLogger())
	t.Cleanup(old.Shutdown)
	if _, err := old.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	return old
}

// startSuccessor is the new process's server, as the upgrade starts it:
// on old's listening sockets, with its UDP services held until it has
// taken old's flows.
func startSuccessor(t *testing.T, old *Server, cfg *config.Config) *Server {
	t.Helper()
	socks, err := old.ListenSockets()
	if err != nil {
		t.Fatal(err)
	}
	successor := NewServer(hclog.NewNullLogger())
	t.Cleanup(successor.Shutdown)
	successor.Adopt(socks)
	successor.HoldInheritedUDP()
	if _, err := successor.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	return successor
}

// flowPass is how passing the flows went, on both sides.
type flowPass struct {
	passed         FlowsPassed
	handOverErr    error
	taken, refused int
	takeErr        error
}

// mustSucceed stops the test unless both sides passed without error:
// the counts of a failed pass say nothing.
func (p flowPass) mustSucceed(t *testing.T) {
	t.Helper()
	if p.handOverErr != nil {
		t.Fatal(p.handOverErr)
	}
	if p.takeErr != nil {
		t.Fatal(p.takeErr)
	}
}

// passFlows passes old's flows to successor, the two running at once
// as the two processes of an upgrade do.
func passFlows(t *testing.T, old, successor *Server) flowPass {
	t.Helper()
	return passFlowsThen(t, old, successor, func() {})
}

// passFlowsThen is passFlows that calls meanwhile once HandOver has
// returned, while the successor may still be taking the flows. A failed
// HandOver leaves its end open until then; it is closed after, so that
// the successor does not wait out its timeout.
func passFlowsThen(t *testing.T, old, successor *Server, meanwhile func()) flowPass {
	t.Helper()
	oldEnd, newEnd := flowSocketPair(t)
	var p flowPass
	took := make(chan struct{})
	go func() {
		defer close(took)
		p.taken, p.refused, p.takeErr = successor.TakeFlows(newEnd, FlowPassTimeout)
	}()
	p.passed, p.handOverErr = old.HandOver(oldEnd)
	meanwhile()
	if p.handOverErr != nil {
		oldEnd.Close()
	}
	<-took
	return p
}

// flowClient is a client with a flow in the service, and what its first
// datagram found: the backend, and the port the backend saw it from.
type flowClient struct {
	conn          *net.UDPConn
	backend, peer string
}

// openFlows gives each of n new clients of the service at listen a flow,
// from the loopback address of listen's family.
func openFlows(t *testing.T, listen netip.AddrPort, n int) []flowClient {
	t.Helper()
	clients := make([]flowClient, n)
	for i := range clients {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(listen.Addr(), 0)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		backend, peer := ask(t, c, listen, fmt.Sprintf("hello %d", i))
		clients[i] = flowClient{c, backend, peer}
	}
	return clients
}

// freeLoopbackUDPPort is a loopback UDP address nothing is bound to.
func freeLoopbackUDPPort(t *testing.T) netip.AddrPort {
	t.Helper()
	return freeUDPPortOn(t, loopback)
}

// freeUDPPortOn is freeLoopbackUDPPort on another loopback address.
func freeUDPPortOn(t *testing.T, addr netip.Addr) netip.AddrPort {
	t.Helper()
	probe, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	return probe.LocalAddr().(*net.UDPAddr).AddrPort()
}

// TestUpgradePassesUDPFlows passes a UDP service's flows with its
// sockets: each flow the successor's config takes keeps its socket, so
// its backend sees the same port after the hand-over, and the old
// server forwards nothing more; a flow whose backend the successor's
// config dropped stays with the old server, which passes the reply it
// still owes. Datagrams sent while the flows pass wait in the sockets.
func TestUpgradePassesUDPFlows(t *testing.T) {
	kept, dropped := peerReporter(t, "kept"), peerReporter(t, "dropped")
	listen := freeLoopbackUDPPort(t)
	game := udpService{listen: listen, workers: 2, idleTimeout: time.Second, spreadPorts: true, backends: []netip.AddrPort{kept, dropped}}
	old := startOldServer(t, game.config(t))
	flows := openFlows(t, listen, 40)
	onKept, onDropped := -1, -1
	for i, f := range flows {
		if f.backend == "dropped" {
			onDropped = i
		} else {
			onKept = i
		}
	}
	if onDropped < 0 || onKept < 0 {
		t.Fatal("the clients' flows did not go to both backends")
	}

	game.backends = []netip.AddrPort{kept}
	successor := startSuccessor(t, old, game.config(t))
	// Owed by the old server's flow to the dropped backend, and answered
	// after the hand-over.
	slowClient := flows[onDropped].conn
	if _, err := slowClient.WriteToUDPAddrPort([]byte("slow reply"), listen); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the old server forwards it first
	before, _ := old.Services()[0].UDPStats()

	res := passFlowsThen(t, old, successor, func() {
		// Sent while nobody reads the sockets: it waits there.
		if _, err := flows[onKept].conn.WriteToUDPAddrPort([]byte("during the hand-over"), listen); err != nil {
			t.Fatal(err)
		}
	})
	res.mustSucceed(t)
	keptFlows := 0
	for _, f := range flows {
		if f.backend == "kept" {
			keptFlows++
		}
	}
	if res.passed.Passed != keptFlows || res.passed.Kept != len(flows)-keptFlows || res.taken != keptFlows || res.refused != len(flows)-keptFlows {
		t.Errorf("passed %+v, taken %d, refused %d; want %d passed and taken, %d kept and refused",
			res.passed, res.taken, res.refused, keptFlows, len(flows)-keptFlows)
	}
	stopped := make(chan struct{})
	go func() {
		old.Shutdown()
		close(stopped)
	}()

	if backend, peer := answer(t, flows[onKept].conn, "during the hand-over"); backend != "kept" || peer != flows[onKept].peer {
		t.Errorf("the datagram sent during the hand-over reached %s from %s, before kept from %s", backend, peer, flows[onKept].peer)
	}
	if backend, _ := answer(t, slowClient, "slow reply"); backend != "dropped" {
		t.Errorf("the reply owed by the old server's flow came from %s", backend)
	}
	for i, f := range flows {
		backend, peer := ask(t, f.conn, listen, fmt.Sprintf("after %d", i))
		switch {
		case backend != "kept":
			t.Errorf("client %d reached %s after the hand-over", i, backend)
		case f.backend == "kept" && peer != f.peer:
			t.Errorf("client %d: the backend saw its flow from %s, and from %s before the hand-over", i, peer, f.peer)
		}
	}
	after, _ := old.Services()[0].UDPStats()
	if after.DatagramsToBackend != before.DatagramsToBackend {
		t.Errorf("the old server forwarded %d datagrams after the hand-over, want 0", after.DatagramsToBackend-before.DatagramsToBackend)
	}
	if after.FlowsHandedOver != uint64(keptFlows) {
		t.Errorf("old server: flows_handed_over %d, want %d", after.FlowsHandedOver, keptFlows)
	}
	st, _ := successor.Services()[0].UDPStats()
	if st.FlowsTakenOver != uint64(keptFlows) || st.FlowsCreated != uint64(len(flows)-keptFlows) {
		t.Errorf("successor: flows_taken_over %d, flows_created %d; want %d and %d (a flow each for the clients of the dropped backend)",
			st.FlowsTakenOver, st.FlowsCreated, keptFlows, len(flows)-keptFlows)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the old server did not stop once the flows it kept idled out (idle_timeout 1s)")
	}
}

// TestTakeFlowsFromAPeerThatLeaves: a peer that closes the socket
// without passing flows (an l4lb from before flows were passed, or one
// that died) releases the held services at once, and they serve.
func TestTakeFlowsFromAPeerThatLeaves(t *testing.T) {
	listen, cfg := gameOnOneBackend(t, 0)
	old := startOldServer(t, cfg)
	successor := startSuccessor(t, old, cfg)
	old.HandOver(nil)
	oldEnd, newEnd := flowSocketPair(t)
	oldEnd.Close()
	began := time.Now()
	if _, _, err := successor.TakeFlows(newEnd, FlowPassTimeout); err == nil {
		t.Error("TakeFlows from a peer that closed: no error")
	}
	if waited := time.Since(began); waited > FlowPassTimeout/2 {
		t.Errorf("TakeFlows waited %s for a peer that had closed", waited)
	}
	for i := range 5 {
		ask(t, newUDPClient(t, listen).conn, listen, fmt.Sprintf("served %d", i))
	}
}

// TestHandOverToAPeerThatLeaves: when the new process is gone (or an
// l4lb that passes no flows closes its end), every flow stays with the
// old server, which keeps passing its replies.
func TestHandOverToAPeerThatLeaves(t *testing.T) {
	listen, cfg := gameOnOneBackend(t, 0)
	old := startOldServer(t, cfg)
	client := newUDPClient(t, listen).conn
	ask(t, client, listen, "hello")
	if _, err := client.WriteToUDPAddrPort([]byte("slow reply"), listen); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	oldEnd, newEnd := flowSocketPair(t)
	newEnd.Close()
	passed, err := old.HandOver(oldEnd)
	if err == nil || passed.Passed != 0 || passed.Kept != 1 {
		t.Errorf("hand-over to a closed peer: %+v, %v; want an error and the flow kept", passed, err)
	}
	if backend, _ := answer(t, client, "slow reply"); backend != "b" {
		t.Errorf("the reply owed came from %s", backend)
	}
	if st, _ := old.Services()[0].UDPStats(); st.FlowsActive != 1 || st.FlowsHandedOver != 0 {
		t.Errorf("old server after a failed hand-over: %d flows open, %d handed over; want 1 and 0", st.FlowsActive, st.FlowsHandedOver)
	}
}

// TestFlowRecordRoundTrip: a record reads back as written, for both
// address families.
func TestFlowRecordRoundTrip(t *testing.T) {
	for _, rec := range []flowRecord{
		{listenCookie: 7, client: netip.MustParseAddrPort("127.0.0.1:4000"), backend: netip.MustParseAddrPort("10.1.2.3:53"),
			idle: 1500 * time.Millisecond, owed: 3, replies: 1, proxyHeader: true},
		{listenCookie: 1 << 60, client: netip.MustParseAddrPort("[2001:db8::1]:65535"), backend: netip.MustParseAddrPort("[::1]:1"),
			owed: flowAnswered},
		{client: netip.MustParseAddrPort("[::ffff:127.0.0.1]:9"), backend: netip.MustParseAddrPort("127.0.0.2:9")},
		// A link-local client, as mmsg.Batch.Addr gives it (the zone is
		// the interface index), and as the flow table keys its flow.
		{client: netip.MustParseAddrPort("[fe80::1%2]:5000"), backend: netip.MustParseAddrPort("[::1]:53")},
	} {
		b := rec.appendTo(nil)
		if len(b) != flowRecordSize {
			t.Fatalf("record of %d bytes, want %d", len(b), flowRecordSize)
		}
		if got := parseFlowRecord(b); got != rec {
			t.Errorf("read back %+v, wrote %+v", got, rec)
		}
	}
}

// TestUpgradePassesFlowsInSeveralMessages passes more flows than one
// message carries, from three workers: every one is taken and keeps its
// port, and the successor opens none.
func TestUpgradePassesFlowsInSeveralMessages(t *testing.T) {
	const clients = 2*flowsPerMessage + 50
	listen, cfg := gameOnOneBackend(t, 3)
	old := startOldServer(t, cfg)
	flows := openFlows(t, listen, clients)
	successor := startSuccessor(t, old, cfg)
	res := passFlows(t, old, successor)
	res.mustSucceed(t)
	if res.passed.Passed != clients || res.passed.Kept != 0 || res.taken != clients || res.refused != 0 {
		t.Fatalf("passed %+v, taken %d, refused %d; want all %d passed and taken", res.passed, res.taken, res.refused, clients)
	}
	go old.Shutdown()
	for i, f := range flows {
		if _, peer := ask(t, f.conn, listen, fmt.Sprintf("after %d", i)); peer != f.peer {
			t.Fatalf("client %d: the backend saw its flow from %s, and from %s before the hand-over", i, peer, f.peer)
		}
	}
	if st, _ := successor.Services()[0].UDPStats(); st.FlowsCreated != 0 || st.FlowsActive != clients {
		t.Errorf("successor: %d flows created, %d open; want 0 and %d", st.FlowsCreated, st.FlowsActive, clients)
	}
}

// TestHandOverParksAWorkerThatResetItsDeadline: a hand-over that comes
// while a worker forwards a batch, whose forwarding resets the worker's
// read deadline (a flow installed, then removed, and the sweep that finds
// the table empty clears the deadline), still parks the worker at once:
// it does not wait in its read for a datagram that may never come, and
// hold the hand-over until FlowPassTimeout.
func TestHandOverParksAWorkerThatResetItsDeadline(t *testing.T) {
	cfg := udpConfig(startUDPEcho(t, "a"))
	cfg.Workers = 1
	cfg.RepliesPerDatagram = 1
	_, p := newUDPService(t, cfg)
	p.dial = func(backend netip.AddrPort) (*os.File, error) {
		f, err := dialUDP(backend)
		if err != nil {
			return nil, err
		}
		// Sends on the flow fail, so that the worker removes it as
		// answered right away, and the hand-over comes now.
		rc, _ := f.SyscallConn()
		rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_WR) })
		p.handOver()
		return f, nil
	}
	p.start()
	// The worker sleeps in its read without a deadline, and its next
	// sweep is due by the time the datagram comes.
	time.Sleep(2 * udpTick)
	if _, err := newUDPClient(t, cfg.Listen).conn.WriteToUDPAddrPort([]byte("x"), cfg.Listen); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.workers[0].parked:
	case <-time.After(2 * time.Second):
		t.Fatal("the worker still reads its socket 2s after the hand-over")
	}
}

// TestHandOverCountsEveryFlowKept: when passing fails part of the way
// (here the first full message, to a peer that has left), every flow not
// passed counts as kept, those of the services and workers not reached
// yet included.
func TestHandOverCountsEveryFlowKept(t *testing.T) {
	backend := peerReporter(t, "b")
	var cfg string
	var listens []netip.AddrPort
	for _, name := range []string{"one", "two"} {
		listen := freeLoopbackUDPPort(t)
		listens = append(listens, listen)
		cfg += udpService{name: name, listen: listen, workers: 1, drainTimeout: time.Second, backends: []netip.AddrPort{backend}}.text()
	}
	old := startOldServer(t, parseConfig(t, cfg))
	// A full message's worth on each: the first flush fails, on
	// whichever service comes first, and the other has every flow left.
	for _, listen := range listens {
		openFlows(t, listen, flowsPerMessage)
	}
	oldEnd, newEnd := flowSocketPair(t)
	newEnd.Close()
	passed, err := old.HandOver(oldEnd)
	if err == nil || passed.Passed != 0 || passed.Kept != 2*flowsPerMessage {
		t.Errorf("hand-over to a closed peer: %+v, %v; want an error and all %d flows kept", passed, err, 2*flowsPerMessage)
	}
}

// TestTakeFlowsClosesWhatAnEndCarries: descriptors sent with a message
// that passes no flow (a malformed end) are closed, not leaked.
func TestTakeFlowsClosesWhatAnEndCarries(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	oldEnd, newEnd := flowSocketPair(t)
	_, _, err = oldEnd.WriteMsgUnix([]byte{flowMsgEnd}, unix.UnixRights(int(w.Fd())), nil)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	NewServer(hclog.NewNullLogger()).TakeFlows(newEnd, time.Second)
	// The pipe's write end was passed: only the copy TakeFlows received
	// keeps it open.
	r.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := r.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("the descriptor passed with the end is still open: read %v, want EOF", err)
	}
}

// TestUpgradePassesFlowsOpenedAndEndedBetweenRounds: the first round
// passes the flows open while the old workers still serve; a flow opened
// after it goes in the second round, socket and all, and one that ended
// in the old process meanwhile is dropped by the new one, not run twice.
func TestUpgradePassesFlowsOpenedAndEndedBetweenRounds(t *testing.T) {
	listen, cfg := gameOnOneBackend(t, 2)
	old := startOldServer(t, cfg)
	const early = 30
	flows := openFlows(t, listen, early)
	successor := startSuccessor(t, old, cfg)
	// Between the rounds the old server still serves: a new client gets
	// a flow there, and the first client's flow ends there.
	lateClient := newUDPClient(t, listen).conn
	var latePeer string
	var ended *udpFlow
	old.betweenFlowRounds = func() {
		_, latePeer = ask(t, lateClient, listen, "between the rounds")
		// The workers own their tables: the backends' lists tell.
		for _, f := range old.running[socketKey{config.UDP, listen}].udp.openFlowsNow() {
			if f.client == flows[0].conn.LocalAddr().(*net.UDPAddr).AddrPort() {
				ended = f
				f.end()
			}
		}
	}
	res := passFlows(t, old, successor)
	res.mustSucceed(t)
	if ended == nil {
		t.Fatal("the first client's flow was not found between the rounds")
	}
	// early−1 from the first round, and the late one.
	if res.passed.Passed != early || res.passed.Kept != 0 || res.taken != early || res.refused != 0 {
		t.Errorf("passed %+v, taken %d, refused %d; want %d passed and taken, none kept or refused", res.passed, res.taken, res.refused, early)
	}
	go old.Shutdown()
	st, _ := successor.Services()[0].UDPStats()
	if st.FlowsActive != early || st.FlowsTakenOver != early || st.FlowsClosed != 0 {
		t.Errorf("successor: %d flows open, %d taken over, %d closed; want %d, %d, 0", st.FlowsActive, st.FlowsTakenOver, st.FlowsClosed, early, early)
	}
	if _, peer := ask(t, lateClient, listen, "after"); peer != latePeer {
		t.Errorf("the flow opened between the rounds: the backend saw it from %s, and from %s before", peer, latePeer)
	}
	for i, f := range flows[1:] {
		if _, peer := ask(t, f.conn, listen, fmt.Sprintf("after %d", i+1)); peer != f.peer {
			t.Errorf("client %d: the backend saw its flow from %s, and from %s before the hand-over", i+1, peer, f.peer)
		}
	}
	// The flow that ended gets a new one, in the successor.
	if _, peer := ask(t, flows[0].conn, listen, "after its flow ended"); peer == flows[0].peer {
		t.Errorf("the flow that ended between the rounds still runs, from %s", peer)
	}
	if st, _ := successor.Services()[0].UDPStats(); st.FlowsCreated != 1 {
		t.Errorf("successor: %d flows created, want 1 (for the client whose flow ended)", st.FlowsCreated)
	}
}

// TestUpgradePassesAFlowReopenedBetweenRounds: a client whose flow ends
// in the old process between the rounds, and who gets a new flow there
// at once (a DNS client's next query from the same port), has that new
// flow passed in the second round, socket and all: the copy of its first
// flow the successor took in the first round, not confirmed, does not
// stand in the way.
func TestUpgradePassesAFlowReopenedBetweenRounds(t *testing.T) {
	listen, cfg := gameOnOneBackend(t, 1)
	old := startOldServer(t, cfg)
	const early = 5
	flows := openFlows(t, listen, early)
	successor := startSuccessor(t, old, cfg)
	first := flows[0].conn.LocalAddr().(*net.UDPAddr).AddrPort()
	var reopenedPeer string
	old.betweenFlowRounds = func() {
		for _, f := range old.running[socketKey{config.UDP, listen}].udp.openFlowsNow() {
			if f.client == first {
				f.end()
			}
		}
		_, reopenedPeer = ask(t, flows[0].conn, listen, "between the rounds")
	}
	res := passFlows(t, old, successor)
	res.mustSucceed(t)
	go old.Shutdown()
	if reopenedPeer == "" || reopenedPeer == flows[0].peer {
		t.Fatalf("the flow reopened between the rounds came from %q, before from %s", reopenedPeer, flows[0].peer)
	}
	if res.passed.Passed != early || res.passed.Kept != 0 || res.taken != early || res.refused != 0 {
		t.Errorf("passed %+v, taken %d, refused %d; want %d passed and taken, none kept or refused", res.passed, res.taken, res.refused, early)
	}
	if _, peer := ask(t, flows[0].conn, listen, "after"); peer != reopenedPeer {
		t.Errorf("the flow reopened between the rounds: the backend saw it from %s after the hand-over, from %s before", peer, reopenedPeer)
	}
	if st, _ := successor.Services()[0].UDPStats(); st.FlowsCreated != 0 || st.FlowsTakenOver != early {
		t.Errorf("successor: %d flows created, %d taken over; want 0 and %d", st.FlowsCreated, st.FlowsTakenOver, early)
	}
}

// TestUpgradeCountsEveryFlowOnceOverTwoRounds: a flow the successor does
// not take in the second round stays with the old server, and counts as
// kept there and refused in the successor, as one it does not take in
// the first round does: one opened between the rounds to a backend the
// successor's config dropped, and one of the first round whose copy
// ended in the successor before it was confirmed.
func TestUpgradeCountsEveryFlowOnceOverTwoRounds(t *testing.T) {
	kept, dropped := peerReporter(t, "kept"), peerReporter(t, "dropped")
	listen := freeLoopbackUDPPort(t)
	game := udpService{listen: listen, workers: 2, idleTimeout: time.Second, spreadPorts: true, backends: []netip.AddrPort{kept, dropped}}
	old := startOldServer(t, game.config(t))
	// Flows on the backend the successor keeps, and on the other.
	want := map[string]int{}
	var firstKept netip.AddrPort
	for i := 0; want["kept"] == 0 || want["dropped"] == 0; i++ {
		if i == 100 {
			t.Fatal("the clients' flows did not go to both backends")
		}
		c := newUDPClient(t, listen).conn
		backend, _ := ask(t, c, listen, fmt.Sprintf("hello %d", i))
		if backend == "kept" && want["kept"] == 0 {
			firstKept = c.LocalAddr().(*net.UDPAddr).AddrPort()
		}
		want[backend]++
	}
	game.backends = []netip.AddrPort{kept}
	successor := startSuccessor(t, old, game.config(t))
	successorProxy := successor.running[socketKey{config.UDP, listen}].udp
	endedInSuccessor := false
	old.betweenFlowRounds = func() {
		late := map[string]int{}
		for i := 0; late["dropped"] == 0; i++ {
			if i == 100 {
				t.Error("no flow opened between the rounds went to the dropped backend")
				break
			}
			backend, _ := ask(t, newUDPClient(t, listen).conn, listen, fmt.Sprintf("between %d", i))
			late[backend]++
			want[backend]++
		}
		// The successor's copy of a first-round flow ends there (its
		// reader failed): it does not take the confirm.
		for _, f := range successorProxy.openFlowsNow() {
			if f.client == firstKept {
				f.end()
				endedInSuccessor = true
			}
		}
	}
	res := passFlows(t, old, successor)
	res.mustSucceed(t)
	go old.Shutdown()
	if !endedInSuccessor {
		t.Fatal("the successor's copy of the first-round flow was not found")
	}
	wantPassed, wantKept := want["kept"]-1, want["dropped"]+1
	if res.passed.Passed != wantPassed || res.passed.Kept != wantKept || res.taken != wantPassed || res.refused != wantKept {
		t.Errorf("passed %+v, taken %d, refused %d; want %d passed and taken, %d kept and refused",
			res.passed, res.taken, res.refused, wantPassed, wantKept)
	}
}

// TestHandOverCountsAFlowItCouldNotOffer: a flow opened between the
// rounds whose socket the old server cannot duplicate (out of
// descriptors) stays with it, and counts as kept.
func TestHandOverCountsAFlowItCouldNotOffer(t *testing.T) {
	listen, cfg := gameOnOneBackend(t, 1)
	old := startOldServer(t, cfg)
	ask(t, newUDPClient(t, listen).conn, listen, "hello")
	successor := startSuccessor(t, old, cfg)
	var limit unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &limit); err != nil {
		t.Fatal(err)
	}
	var fillers []int
	restore := func() {
		unix.Setrlimit(unix.RLIMIT_NOFILE, &limit)
		for _, fd := range fillers {
			unix.Close(fd)
		}
		fillers = nil
	}
	defer restore()
	old.betweenFlowRounds = func() {
		ask(t, newUDPClient(t, listen).conn, listen, "between the rounds")
		// No descriptor left: the late flow's socket is not duplicated.
		entries, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Error(err)
			return
		}
		highest := 0
		for _, e := range entries {
			if fd, err := strconv.Atoi(e.Name()); err == nil {
				highest = max(highest, fd)
			}
		}
		low := limit
		low.Cur = uint64(highest + 1)
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
			t.Error(err)
			return
		}
		for {
			fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				break
			}
			fillers = append(fillers, fd)
		}
	}
	// The successor, in this process, takes what follows the failure
	// with the descriptors back.
	res := passFlowsThen(t, old, successor, restore)
	if res.handOverErr == nil {
		t.Fatal("the hand-over duplicated a socket with no descriptor left")
	}
	if res.passed.Passed != 1 || res.passed.Kept != 1 {
		t.Errorf("passed %+v, %v; want the first-round flow passed and the late one kept", res.passed, res.handOverErr)
	}
}

// TestUpgradePassesIPv6Flows: a service on ::1 passes its flows as one
// on 127.0.0.1 does.
func TestUpgradePassesIPv6Flows(t *testing.T) {
	ipv6Loopback := netip.IPv6Loopback()
	backend := peerReporterOn(t, "b", ipv6Loopback)
	listen := freeUDPPortOn(t, ipv6Loopback)
	cfg := udpService{listen: listen, workers: 2, idleTimeout: time.Second, backends: []netip.AddrPort{backend}}.config(t)
	old := startOldServer(t, cfg)
	const clients = 20
	flows := openFlows(t, listen, clients)
	successor := startSuccessor(t, old, cfg)
	res := passFlows(t, old, successor)
	res.mustSucceed(t)
	if res.passed.Passed != clients {
		t.Errorf("passed %+v, want all %d", res.passed, clients)
	}
	go old.Shutdown()
	for i, f := range flows {
		if _, peer := ask(t, f.conn, listen, fmt.Sprintf("after %d", i)); peer != f.peer {
			t.Errorf("client %d: the backend saw its flow from %s, and from %s before the hand-over", i, peer, f.peer)
		}
	}
}

// A flow record names its backend without a zone: a link-local backend
// configured with one (fe80::1%lo) is still found, and a backend at
// another port is not.
func TestConfiguredBackendMatchesALinkLocalBackendWithoutItsZone(t *testing.T) {
	zoned := netip.MustParseAddrPort("[fe80::1%lo]:5353")
	cfg := udpConfig(zoned)
	svc := NewService(cfg, hclog.NewNullLogger())
	if b := svc.configuredBackend(netip.MustParseAddrPort("[fe80::1]:5353")); b == nil || b.addr != zoned {
		t.Errorf("configuredBackend of the zoned backend without its zone: %v", b)
	}
	if b := svc.configuredBackend(netip.MustParseAddrPort("[fe80::1]:5354")); b != nil {
		t.Errorf("configuredBackend at another port: %v", b.addr)
	}
}
