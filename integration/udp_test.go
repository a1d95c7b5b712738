package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// udpEchoPort is where the UDP echo backends listen and l4lb's UDP
// services too.
const udpEchoPort = 7100

// udpIOTimeout bounds every wait for a reply that must come.
const udpIOTimeout = 5 * time.Second

// startUDPEcho runs a UDP backend on addr in namespace ns. It answers each
// datagram with its name, the source address it saw and the datagram:
// NAME \0 ADDR:PORT \0 DATAGRAM. Cleanup stops it.
func startUDPEcho(t *testing.T, ns, name string, addr netip.AddrPort) {
	t.Helper()
	var c *net.UDPConn
	err := inNetns(ns, func() error {
		var err error
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatalf("udp backend %s: listen on %s in %s: %v", name, addr, ns, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		in := make([]byte, 1<<16)
		var out []byte
		for {
			n, from, err := c.ReadFromUDPAddrPort(in)
			if err != nil {
				return // closed by cleanup
			}
			out = append(append(append(append(out[:0], name...), 0), from.String()...), 0)
			out = append(out, in[:n]...)
			c.WriteToUDPAddrPort(out, from)
		}
	}()
	t.Cleanup(func() {
		c.Close()
		<-done
	})
}

// udpEchoReply is a parsed answer of startUDPEcho's backends.
type udpEchoReply struct {
	Backend string         // the backend's name
	Seen    netip.AddrPort // the source the backend saw: l4lb's socket of the flow
	Data    []byte
}

func parseUDPEcho(b []byte) (udpEchoReply, error) {
	parts := bytes.SplitN(b, []byte{0}, 3)
	if len(parts) != 3 {
		return udpEchoReply{}, fmt.Errorf("echo reply %.40q: want NAME\\0ADDR\\0DATA", b)
	}
	seen, err := netip.ParseAddrPort(string(parts[1]))
	if err != nil {
		return udpEchoReply{}, fmt.Errorf("echo reply: %w", err)
	}
	return udpEchoReply{Backend: string(parts[0]), Seen: seen, Data: parts[2]}, nil
}

// udpService is one UDP [services.NAME] table of a test config.
type udpService struct {
	Name     string
	Listen   netip.AddrPort
	HashKey  string // "source_ip_port" when empty
	Idle     string // "30s" when empty
	Drain    string // "2s" when empty
	MaxFlows int    // 1000 when 0
	Replies  int    // replies_per_datagram; not set when 0
	Backends []netip.AddrPort
	Extra    string // appended after the backends: a [services.NAME.health] table
}

func (s udpService) toml() string {
	def := func(v, d string) string {
		if v == "" {
			return d
		}
		return v
	}
	maxFlows := s.MaxFlows
	if maxFlows == 0 {
		maxFlows = 1000
	}
	var b strings.Builder
	fmt.Fprintf(&b, `
[services.%s]
listen = %q
protocol = "udp"
balance = "maglev"
hash_key = %q
workers = 2
idle_timeout = %q
drain_timeout = %q
max_flows = %d
`, s.Name, s.Listen, def(s.HashKey, "source_ip_port"), def(s.Idle, "30s"), def(s.Drain, "2s"), maxFlows)
	if s.Replies > 0 {
		fmt.Fprintf(&b, "replies_per_datagram = %d\n", s.Replies)
	}
	for _, a := range s.Backends {
		fmt.Fprintf(&b, "\n  [[services.%s.backends]]\n  address = %q\n", s.Name, a)
	}
	b.WriteString(s.Extra)
	return b.String()
}

// udpConf renders a config of UDP services with the admin endpoint off.
func udpConf(svcs ...udpService) string {
	var b strings.Builder
	b.WriteString("[admin]\nlisten = \"\"\n")
	for _, s := range svcs {
		b.WriteString(s.toml())
	}
	return b.String()
}

// udpEchoService starts an echo backend on port in every backend namespace
// and returns the service balancing them on the IPv4 VIP.
func udpEchoService(t *testing.T, top *topology, name string, port uint16) udpService {
	t.Helper()
	svc := udpService{Name: name, Listen: netip.AddrPortFrom(vip4, port)}
	for _, b := range top.Backends {
		addr := netip.AddrPortFrom(b.Addr4, port)
		startUDPEcho(t, b.NS, b.Name, addr)
		svc.Backends = append(svc.Backends, addr)
	}
	return svc
}

// udpClient is a client socket in a client namespace, bound to one source
// address and port, unconnected so that it sees where replies come from.
type udpClient struct {
	conn *net.UDPConn
	src  netip.AddrPort
	dst  netip.AddrPort
}

func newUDPClient(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort) *udpClient {
	t.Helper()
	var c *net.UDPConn
	err := inNetns(ns, func() error {
		var err error
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)))
		return err
	})
	if err != nil {
		t.Fatalf("udp client on %s in %s: %v", src, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return &udpClient{conn: c, src: c.LocalAddr().(*net.UDPAddr).AddrPort(), dst: dst}
}

// exchange sends data and waits up to timeout for its echo, which must
// come from the service address and carry data back unchanged.
func (c *udpClient) exchange(data []byte, timeout time.Duration) (udpEchoReply, error) {
	if _, err := c.conn.WriteToUDPAddrPort(data, c.dst); err != nil {
		return udpEchoReply{}, err
	}
	return c.read(timeout)
}

func (c *udpClient) read(timeout time.Duration) (udpEchoReply, error) {
	buf := make([]byte, 1<<16)
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	n, from, err := c.conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		return udpEchoReply{}, fmt.Errorf("from %s: %w", c.src, err)
	}
	if from != c.dst {
		return udpEchoReply{}, fmt.Errorf("from %s: reply from %s, want the service address %s", c.src, from, c.dst)
	}
	return parseUDPEcho(buf[:n])
}

// Sequenced, checksummed datagrams: seq u32 | flow u32 | payload | the
// first 8 bytes of SHA-256 of everything before.
func seqDatagram(flow, seq uint32, rng *rand.ChaCha8, size int) []byte {
	b := make([]byte, 8+size, 8+size+8)
	binary.BigEndian.PutUint32(b[0:], seq)
	binary.BigEndian.PutUint32(b[4:], flow)
	rng.Read(b[8:])
	sum := sha256.Sum256(b)
	return append(b, sum[:8]...)
}

func checkSeqDatagram(b []byte) (flow, seq uint32, err error) {
	if len(b) < 16 {
		return 0, 0, fmt.Errorf("datagram of %d bytes", len(b))
	}
	body := b[:len(b)-8]
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:8], b[len(b)-8:]) {
		return 0, 0, errors.New("checksum mismatch")
	}
	return binary.BigEndian.Uint32(b[4:]), binary.BigEndian.Uint32(b[0:]), nil
}

// flowResult is what one sequenced flow saw.
type flowResult struct {
	src     netip.AddrPort
	backend string         // the backend of every reply
	seen    netip.AddrPort // l4lb's socket toward the backend, the same for every reply
}

// runSeqFlow sends n sequenced datagrams of random sizes with up to window
// of them unanswered, and checks that every echo comes back, in order,
// intact, from the service address, from one backend and one l4lb socket.
func runSeqFlow(c *udpClient, id uint32, n, window int) (flowResult, error) {
	res := flowResult{src: c.src}
	tokens := make(chan struct{}, window)
	sendErr := make(chan error, 1)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		var key [32]byte
		binary.LittleEndian.PutUint32(key[:], id)
		rng := rand.NewChaCha8(key)
		sizes := rand.New(rand.NewPCG(uint64(id), 1))
		for seq := range n {
			select {
			case tokens <- struct{}{}:
			case <-stop:
				sendErr <- nil
				return
			}
			if _, err := c.conn.WriteToUDPAddrPort(seqDatagram(id, uint32(seq), rng, 16+sizes.IntN(1384)), c.dst); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	for want := range n {
		r, err := c.read(udpIOTimeout)
		if err != nil {
			return res, fmt.Errorf("flow %d: waiting for seq %d: %w", id, want, err)
		}
		<-tokens
		flow, seq, err := checkSeqDatagram(r.Data)
		switch {
		case err != nil:
			return res, fmt.Errorf("flow %d seq %d: %w", id, want, err)
		case flow != id:
			return res, fmt.Errorf("flow %d got the echo of flow %d", id, flow)
		case seq != uint32(want):
			return res, fmt.Errorf("flow %d: got seq %d, want %d (loss or reordering)", id, seq, want)
		}
		if want == 0 {
			res.backend, res.seen = r.Backend, r.Seen
		} else if r.Backend != res.backend || r.Seen != res.seen {
			return res, fmt.Errorf("flow %d seq %d: echoed by %s via %s, earlier by %s via %s", id, seq, r.Backend, r.Seen, res.backend, res.seen)
		}
	}
	return res, <-sendErr
}

// TestUDPFlows runs many flows (several source addresses and ports, two
// client namespaces) of sequenced, checksummed datagrams through a UDP
// service: no loss, no reordering, each flow on one backend, the one the
// Maglev plan predicts, and every reply from the service address.
func TestUDPFlows(t *testing.T) {
	const addrs, portsPerAddr, datagrams, window = 3, 2, 300, 8
	top := newTopology(t, 2, addrs, 3)
	svc := udpEchoService(t, top, "game", udpEchoPort)
	conf := udpConf(svc)
	l := startLB(t, top.LB, conf)
	plan := planFor(t, conf, svc.Name)

	var clients []*udpClient
	for _, cns := range top.Clients {
		for _, src := range cns.Addrs4 {
			for range portsPerAddr {
				clients = append(clients, newUDPClient(t, cns.NS, src, svc.Listen))
			}
		}
	}
	results := make([]flowResult, len(clients))
	errs := make([]error, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() { results[i], errs[i] = runSeqFlow(c, uint32(i), datagrams, window) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	used := map[string]int{}
	for _, r := range results {
		if want := firstChoice(t, top, plan, r.src); r.backend != want {
			t.Errorf("flow from %s went to %s, the plan says %s", r.src, r.backend, want)
		}
		used[r.backend]++
	}
	if len(used) < 2 {
		t.Errorf("%d flows all went to %v; want a spread", len(results), used)
	}
	t.Logf("%d flows × %d datagrams, window %d: no loss, no reordering; flows per backend %v", len(clients), datagrams, window, used)
	if strings.Contains(l.Output(), "refused") {
		t.Errorf("l4lb refused flows:\n%s", l.Output())
	}
}

// iperf3UDPResult is the part of `iperf3 -u -J` output the test reads.
type iperf3UDPResult struct {
	Error string `json:"error"`
	End   struct {
		Sum struct {
			Bytes       int64   `json:"bytes"`
			Packets     int64   `json:"packets"`
			LostPackets int64   `json:"lost_packets"`
			LostPercent float64 `json:"lost_percent"`
			JitterMs    float64 `json:"jitter_ms"`
		} `json:"sum"`
	} `json:"end"`
}

// TestUDPIperf3 runs `iperf3 -u` through l4lb: its TCP control connection
// goes through a TCP service and its datagrams through a UDP service on the
// same port; hashing the source IP sends both to the same backend.
func TestUDPIperf3(t *testing.T) {
	top := newTopology(t, 1, 1, 2)
	const port = 5201
	tcp := service{Name: "iperf_tcp", Listen: netip.AddrPortFrom(vip4, port)}
	udp := udpService{Name: "iperf_udp", Listen: netip.AddrPortFrom(vip4, port), HashKey: "source_ip"}
	for _, b := range top.Backends {
		startIperf3Server(t, b.NS, b.Addr4.String(), strconv.Itoa(port))
		tcp.Backends = append(tcp.Backends, netip.AddrPortFrom(b.Addr4, port))
		udp.Backends = append(udp.Backends, netip.AddrPortFrom(b.Addr4, port))
	}
	startLB(t, top.LB, configTOML(tcp)+udp.toml())

	c := top.Clients[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", c.NS,
		"iperf3", "-u", "-c", vip4.String(), "-p", strconv.Itoa(port), "-B", c.Addrs4[0].String(),
		"-b", "20M", "-l", "1200", "-t", "2", "-J", "--connect-timeout", "3000").Output()
	var res iperf3UDPResult
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		t.Fatalf("iperf3 client: %v\n%s", errors.Join(err, jerr), out)
	}
	if err != nil || res.Error != "" {
		t.Fatalf("iperf3 client: %v: %s", err, res.Error)
	}
	sum := res.End.Sum
	if sum.Packets <= 0 || sum.Bytes <= 0 || sum.LostPackets >= sum.Packets {
		t.Fatalf("iperf3 -u: %d packets, %d lost, %d bytes; want datagrams through\n%s", sum.Packets, sum.LostPackets, sum.Bytes, out)
	}
	t.Logf("iperf3 -u through l4lb: %d datagrams, %d lost (%.2f%%), jitter %.3f ms",
		sum.Packets, sum.LostPackets, sum.LostPercent, sum.JitterMs)
}

// TestUDPMaxFlowsAndExpiry fills max_flows, checks that a further flow is
// refused while the established ones keep working, then measures when the
// refused client gets in: when the established flows expire, idle_timeout
// after their last datagram.
func TestUDPMaxFlowsAndExpiry(t *testing.T) {
	const maxFlows, idle = 4, 2 * time.Second
	top := newTopology(t, 1, 1, 2)
	svc := udpEchoService(t, top, "capped", udpEchoPort)
	svc.MaxFlows, svc.Idle = maxFlows, idle.String()
	startLB(t, top.LB, udpConf(svc))
	c := top.Clients[0]

	flows := make([]*udpClient, maxFlows)
	seen := make([]netip.AddrPort, maxFlows)
	for i := range flows {
		flows[i] = newUDPClient(t, c.NS, c.Addrs4[0], svc.Listen)
		r, err := flows[i].exchange([]byte("hello"), udpIOTimeout)
		if err != nil {
			t.Fatal(err)
		}
		seen[i] = r.Seen
	}
	extra := newUDPClient(t, c.NS, c.Addrs4[0], svc.Listen)
	if r, err := extra.exchange([]byte("one too many"), 300*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("flow %d past max_flows = %d: got %+v, %v; want no reply", maxFlows+1, maxFlows, r, err)
	}
	var last time.Time
	for i, f := range flows {
		r, err := f.exchange([]byte("still here"), udpIOTimeout)
		if err != nil {
			t.Fatalf("established flow %d after a refusal: %v", i, err)
		}
		if r.Seen != seen[i] {
			t.Errorf("established flow %d moved from l4lb socket %s to %s", i, seen[i], r.Seen)
		}
		last = time.Now()
	}

	// The refused client retries until a flow expires and frees a slot.
	const probe = 100 * time.Millisecond
	var freed time.Time
	for range int((idle + 3*time.Second) / probe) {
		if _, err := extra.exchange([]byte("let me in"), probe); err == nil {
			freed = time.Now()
			break
		} else if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal(err)
		}
	}
	if freed.IsZero() {
		t.Fatalf("no flow expired within %v of idle_timeout %v", 3*time.Second, idle)
	}
	// The flows' last datagram passed l4lb before last; a slot frees
	// idle_timeout after that, within the sweep's granularity.
	after := freed.Sub(last)
	if after < idle-probe || after > idle+time.Second {
		t.Errorf("established flows expired %v after their last datagram; want idle_timeout %v ± 1 s", after, idle)
	}
	t.Logf("flows expired %v after their last datagram (idle_timeout %v)", after.Round(time.Millisecond), idle)

	r, err := flows[0].exchange([]byte("back"), udpIOTimeout)
	if err != nil {
		t.Fatalf("expired client coming back: %v", err)
	}
	if r.Seen == seen[0] {
		t.Errorf("client came back through the same l4lb socket %s; want a new flow", r.Seen)
	}
}

// TestUDPRepliesPerDatagram is DNS's pattern: each query from a new port,
// one reply each. With replies_per_datagram = 1 a flow ends at its reply,
// so a few flow slots serve any number of queries; without it the fifth
// query would be refused until the first flow idled out.
func TestUDPRepliesPerDatagram(t *testing.T) {
	const maxFlows, queriers, queries = 4, 2, 100
	top := newTopology(t, 1, 1, 2)
	svc := udpEchoService(t, top, "dns", udpEchoPort)
	svc.MaxFlows, svc.Replies = maxFlows, 1
	startLB(t, top.LB, udpConf(svc))
	c := top.Clients[0]
	// Each querier has at most two flows open: the one waiting for its
	// reply, and the one before it, closing just after its reply.
	var wg sync.WaitGroup
	errs := make(chan error, queriers)
	for q := range queriers {
		wg.Go(func() {
			for i := range queries {
				port := newUDPClient(t, c.NS, c.Addrs4[0], svc.Listen)
				_, err := port.exchange(fmt.Appendf(nil, "query %d.%d", q, i), udpIOTimeout)
				port.conn.Close()
				if err != nil {
					errs <- fmt.Errorf("query %d of querier %d, max_flows = %d: %w", i, q, maxFlows, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// udpLoop exchanges a datagram every interval on one flow until stopped,
// recording which backend answered each.
type udpLoop struct {
	c    *udpClient
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex // guards replies
	replies []loopReply
}

type loopReply struct {
	at      time.Time
	backend string // "" when no reply came
	seen    netip.AddrPort
}

func startUDPLoop(c *udpClient, interval time.Duration) *udpLoop {
	l := &udpLoop{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for seq := 0; ; seq++ {
			r, err := c.exchange([]byte("seq "+strconv.Itoa(seq)), 300*time.Millisecond)
			rep := loopReply{at: time.Now()}
			if err == nil {
				rep.backend, rep.seen = r.Backend, r.Seen
			}
			l.mu.Lock()
			l.replies = append(l.replies, rep)
			l.mu.Unlock()
			select {
			case <-l.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return l
}

func (l *udpLoop) finish() []loopReply {
	close(l.stop)
	<-l.done
	return l.replies
}

// TestUDPReload removes a backend while flows run: flows on the kept
// backends carry on untouched, flows on the removed one keep it until
// drain_timeout and then start over on a kept backend; new flows never go
// to the removed one.
func TestUDPReload(t *testing.T) {
	const drain = 2 * time.Second
	top := newTopology(t, 1, 12, 3)
	svc := udpEchoService(t, top, "game", udpEchoPort)
	svc.HashKey, svc.Drain = "source_ip", drain.String()
	conf := udpConf(svc)
	l := startLB(t, top.LB, conf)
	plan := planFor(t, conf, svc.Name)
	c := top.Clients[0]
	removed := top.Backends[2]

	// Hashing the source IP makes each address's backend fixed: pick
	// addresses on the removed backend and on the others.
	var onRemoved, onKept []netip.Addr
	for _, a := range c.Addrs4 {
		if firstChoice(t, top, plan, netip.AddrPortFrom(a, 1)) == removed.Name {
			onRemoved = append(onRemoved, a)
		} else {
			onKept = append(onKept, a)
		}
	}
	if len(onRemoved) < 1 || len(onKept) < 2 {
		t.Fatalf("the plan puts %d client addresses on %s and %d elsewhere; the test needs 1 and 2", len(onRemoved), removed.Name, len(onKept))
	}
	var loops []*udpLoop
	for _, a := range append(onRemoved[:1], onKept[:2]...) {
		loops = append(loops, startUDPLoop(newUDPClient(t, c.NS, a, svc.Listen), 20*time.Millisecond))
	}
	time.Sleep(500 * time.Millisecond)

	next := svc
	next.Backends = svc.Backends[:2]
	reloaded := reloadTo(t, l, udpConf(next), 2)
	// New flows, from every address, avoid the removed backend at once.
	for _, a := range c.Addrs4 {
		r, err := newUDPClient(t, c.NS, a, svc.Listen).exchange([]byte("new"), udpIOTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if r.Backend == removed.Name {
			t.Errorf("new flow from %s went to removed backend %s", a, removed.Name)
		}
	}
	time.Sleep(drain + 1500*time.Millisecond)

	for i, lp := range loops {
		replies := lp.finish()
		first := replies[0]
		if i == 0 {
			// On the removed backend until the drain ends, then on a kept
			// one; replies lost at the switch are allowed within ±1 s of it.
			var switched time.Time
			for _, r := range replies {
				if r.backend != "" && r.backend != removed.Name {
					switched = r.at
					break
				}
			}
			if switched.IsZero() {
				t.Errorf("flow from %s stayed on removed backend %s %v after the reload (drain_timeout %v)", lp.c.src, removed.Name, drain+1500*time.Millisecond, drain)
				continue
			}
			if d := switched.Sub(reloaded); d < drain-100*time.Millisecond || d > drain+time.Second {
				t.Errorf("flow from %s left removed backend %v after the reload; want drain_timeout %v ± 1 s", lp.c.src, d, drain)
			}
			for _, r := range replies {
				inWindow := r.at.After(reloaded.Add(drain-time.Second)) && r.at.Before(reloaded.Add(drain+time.Second))
				switch {
				case r.backend == "" && !inWindow:
					t.Errorf("flow from %s: no reply at %v after the reload", lp.c.src, r.at.Sub(reloaded))
				case r.backend == removed.Name && r.at.After(switched):
					t.Errorf("flow from %s back on removed backend after the drain", lp.c.src)
				}
			}
			t.Logf("flow from %s: on %s until %v after the reload, then on another backend", lp.c.src, removed.Name, switched.Sub(reloaded).Round(time.Millisecond))
			continue
		}
		for _, r := range replies {
			if r.backend != first.backend || r.seen != first.seen {
				t.Errorf("flow from %s on kept backend %s: reply at %v from %q via %s", lp.c.src, first.backend,
					r.at.Sub(reloaded), r.backend, r.seen)
				break
			}
		}
		t.Logf("flow from %s: %d exchanges, all on %s", lp.c.src, len(replies), first.backend)
	}
}

// TestUDPHealthSendExpect checks UDP backends with send_expect over UDP:
// a backend whose datagrams are dropped is marked down, new flows avoid
// it, and it is back in the route once its datagrams pass again.
func TestUDPHealthSendExpect(t *testing.T) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 3
	top := newTopology(t, 1, 8, 3)
	svc := udpEchoService(t, top, "game", udpEchoPort)
	// The echo backends answer NAME\0ADDR\0DATA: the probe expects the
	// backend-name prefix every one of them shares.
	svc.Extra = fmt.Sprintf("\n[services.game.health]\nkind = \"send_expect\"\ninterval = %q\ntimeout = %q\nrise = %d\nfall = %d\nsend = \"ping\"\nexpect = %q\n",
		interval, timeout, rise, fall, top.Backends[0].Name[:1])
	l := startLB(t, top.LB, udpConf(svc))
	waitAllUp(t, l, svc.Backends)

	victim, ns := svc.Backends[0], top.Backends[0].NS
	mark := logMark(l.process)
	dropped := time.Now()
	nftInputRule(t, ns, fmt.Sprintf("udp dport %d drop", udpEchoPort))
	at, _, err := waitLog(l.process, mark, fall*interval+timeout+healthSlack, transitionTo(victim, "down")...)
	if err != nil {
		t.Fatalf("backend with dropped datagrams: %v", err)
	}
	t.Logf("backend marked down %v after its datagrams were dropped (bound %v + slack)", at.Sub(dropped).Round(time.Millisecond), fall*interval+timeout)
	// Health changes are coalesced for ~100 ms before the table is rebuilt.
	if _, _, err := waitLog(l.process, mark, time.Second, "routing table rebuilt", "healthy=2 "); err != nil {
		t.Fatal(err)
	}

	c := top.Clients[0]
	for _, a := range c.Addrs4 {
		r, err := newUDPClient(t, c.NS, a, svc.Listen).exchange([]byte("new"), udpIOTimeout)
		if err != nil {
			t.Fatalf("new flow from %s while %s is down: %v", a, victim, err)
		}
		if r.Backend == top.Backends[0].Name {
			t.Errorf("new flow from %s went to %s, which is down", a, r.Backend)
		}
	}

	mark = logMark(l.process)
	restored := time.Now()
	nftUnblock(t, ns)
	at, _, err = waitLog(l.process, mark, rise*interval+healthSlack, transitionTo(victim, "up")...)
	if err != nil {
		t.Fatalf("backend after its datagrams pass again: %v", err)
	}
	t.Logf("backend marked up %v after the drop rule went (bound %v + slack)", at.Sub(restored).Round(time.Millisecond), rise*interval)
	if _, _, err := waitLog(l.process, mark, time.Second, "routing table rebuilt", "healthy=3 "); err != nil {
		t.Fatal(err)
	}
	backOnVictim := 0
	for _, a := range c.Addrs4 {
		for range 4 { // source_ip_port hashing: each new port is a new draw
			cl := newUDPClient(t, c.NS, a, svc.Listen)
			r, err := cl.exchange([]byte("again"), udpIOTimeout)
			if err != nil {
				t.Fatalf("flow from %s after recovery: %v", cl.src, err)
			}
			if r.Backend == top.Backends[0].Name {
				backOnVictim++
			}
		}
	}
	if backOnVictim == 0 {
		t.Errorf("no new flow went to %s after it came back up", top.Backends[0].Name)
	}
}
