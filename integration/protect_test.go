package integration

// Protection: connection limits, access lists, PROXY protocol both ways,
// half_close_timeout and descriptor exhaustion, end to end.

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// guarded is a TCP or UDP [services.NAME] table with protection keys.
type guarded struct {
	Name     string
	Protocol string // "tcp" when empty
	Listen   netip.AddrPort
	Backends []netip.AddrPort
	Lines    []string // extra service keys: `max_connections = 3`
	// BackendLines are extra keys of every backend: `max_connections = 2`.
	BackendLines []string
}

// guardedConf renders services with the admin endpoint on adminAddr.
func guardedConf(svcs ...guarded) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[admin]\nlisten = %q\n", adminAddr)
	for _, s := range svcs {
		proto := s.Protocol
		if proto == "" {
			proto = "tcp"
		}
		fmt.Fprintf(&b, "\n[services.%s]\nlisten = %q\nprotocol = %q\nworkers = 2\nconnect_timeout = \"2s\"\ndrain_timeout = \"1s\"\n",
			s.Name, s.Listen, proto)
		if proto == "tcp" {
			b.WriteString("hash_key = \"source_ip_port\"\n")
		}
		for _, l := range s.Lines {
			b.WriteString(l + "\n")
		}
		for _, a := range s.Backends {
			fmt.Fprintf(&b, "\n  [[services.%s.backends]]\n  address = %q\n", s.Name, a)
			for _, l := range s.BackendLines {
				b.WriteString("  " + l + "\n")
			}
		}
	}
	return b.String()
}

// guardedStatus is the part of GET /status these tests read.
type guardedStatus struct {
	OpenConnections int64 `json:"open_connections"`
	MaxConnections  int64 `json:"max_connections"`
	Services        []struct {
		Name     string            `json:"name"`
		Rejected map[string]uint64 `json:"rejected"`
		UDP      *struct {
			Drops map[string]uint64 `json:"drops"`
		} `json:"udp"`
	} `json:"services"`
}

func rejections(t *testing.T, ns, service string) (tcp, udpDrops map[string]uint64) {
	t.Helper()
	var st guardedStatus
	if err := json.Unmarshal(adminGet(t, ns, "/status"), &st); err != nil {
		t.Fatal(err)
	}
	for _, s := range st.Services {
		if s.Name == service {
			if s.UDP != nil {
				udpDrops = s.UDP.Drops
			}
			return s.Rejected, udpDrops
		}
	}
	t.Fatalf("no service %s in /status", service)
	return nil, nil
}

// held is a client connection that got its backend's greeting and stays
// open.
type held struct {
	conn    *net.TCPConn
	r       *bufio.Reader
	backend string
}

// holdConn dials dst from src and waits for the greeting.
func holdConn(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort) *held {
	t.Helper()
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(ioTimeout))
	r := bufio.NewReader(c)
	name, err := readGreeting(r)
	if err != nil {
		t.Fatalf("from %s to %s: %v", src, dst, err)
	}
	return &held{conn: c, r: r, backend: name}
}

// echoLine checks that the connection still carries bytes both ways.
func (h *held) echoLine(t *testing.T, line string) {
	t.Helper()
	if _, err := h.conn.Write([]byte(line + "\n")); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := h.r.ReadString('\n')
	if err != nil || got != line+"\n" {
		t.Fatalf("echo of %q: %q, %v", line, got, err)
	}
}

// closedAtOnce dials dst from src and checks that l4lb closes the
// connection within 2 s without a byte: the client reads EOF or a reset
// (which may even reach its connect).
func closedAtOnce(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort, send string) time.Duration {
	t.Helper()
	start := time.Now()
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			return time.Since(start)
		}
		t.Fatal(err)
	}
	defer c.Close()
	if send != "" {
		c.Write([]byte(send))
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 64))
	if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("from %s to %s: read %d bytes, %v; want the connection closed at once", src, dst, n, err)
	}
	return time.Since(start)
}

// TestProtectLimits: max_connections_per_source lets exactly that many
// connections of one client address through and closes the rest at once,
// while another client is unaffected; backend max_connections fills each
// backend to its limit (a full backend is skipped for the next) and then
// refuses.
func TestProtectLimits(t *testing.T) {
	top := newTopology(t, 2, 1, 2)
	counts := &accepts{}
	perSource := guarded{Name: "persource", Listen: netip.AddrPortFrom(vip4, 7301),
		Backends: backendAddrs(t, top, 7301, counts), Lines: []string{"max_connections_per_source = 3"}}
	perBackend := guarded{Name: "perbackend", Listen: netip.AddrPortFrom(vip4, 7302),
		Backends: backendAddrs(t, top, 7302, counts), BackendLines: []string{"max_connections = 2"}}
	startLB(t, top.LB, guardedConf(perSource, perBackend))
	c1, c2 := top.Clients[0], top.Clients[1]
	accepted := func() int { return counts.get("b1") + counts.get("b2") }

	for range 3 {
		holdConn(t, c1.NS, c1.Addrs4[0], perSource.Listen).echoLine(t, "c1")
	}
	before := accepted()
	for range 2 {
		if d := closedAtOnce(t, c1.NS, c1.Addrs4[0], perSource.Listen, ""); d > time.Second {
			t.Errorf("excess connection closed after %v", d)
		}
	}
	// c1 holds its three idle connections; c2 gets its own three.
	for range 3 {
		holdConn(t, c2.NS, c2.Addrs4[0], perSource.Listen).echoLine(t, "c2")
	}
	closedAtOnce(t, c2.NS, c2.Addrs4[0], perSource.Listen, "")
	if got := accepted() - before; got != 3 {
		t.Errorf("backends accepted %d connections while c1 was over its limit and c2 opened 3; want 3", got)
	}

	byBackend := map[string]int{}
	for i := range 4 {
		h := holdConn(t, c1.NS, c1.Addrs4[0], perBackend.Listen)
		h.echoLine(t, fmt.Sprint(i))
		byBackend[h.backend]++
	}
	if byBackend["b1"] != 2 || byBackend["b2"] != 2 {
		t.Errorf("connections per backend %v: want each backend filled to its max_connections of 2", byBackend)
	}
	closedAtOnce(t, c2.NS, c2.Addrs4[0], perBackend.Listen, "")

	tcp, _ := rejections(t, top.LB, "persource")
	if tcp["max_connections_per_source"] != 3 {
		t.Errorf("persource rejected %v: want max_connections_per_source 3", tcp)
	}
	tcp, _ = rejections(t, top.LB, "perbackend")
	if tcp["backends_full"] != 1 {
		t.Errorf("perbackend rejected %v: want backends_full 1", tcp)
	}
	metrics := string(adminGet(t, top.LB, "/metrics"))
	want := `l4lb_connections_rejected_total{reason="max_connections_per_source",service="persource"} 3`
	if !strings.Contains(metrics, want) {
		t.Errorf("/metrics lacks %s", want)
	}
}

// udpCounter is a UDP backend that answers each datagram with
// "NAME SRC", SRC being the client address a PROXY v2 prefix carried
// (or the datagram's own source without one), and counts datagrams.
type udpCounter struct {
	got atomic.Int64
}

func (u *udpCounter) start(t *testing.T, ns, name string, addr netip.AddrPort) {
	t.Helper()
	var c *net.UDPConn
	if err := inNetns(ns, func() error {
		var err error
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1<<16)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			u.got.Add(1)
			src := from.String()
			if h, _, err := parseProxyV2(buf[:n]); err == nil {
				src = h.String()
			}
			c.WriteToUDPAddrPort([]byte(name+" "+src), from)
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
}

// TestProtectAccessLists: a denied client gets no backend connection (the
// backend counts none) and an allowed one works, over TCP and UDP. The
// UDP service also sends PROXY v2 before each datagram: the backend sees
// the client's address.
func TestProtectAccessLists(t *testing.T) {
	top := newTopology(t, 2, 1, 1)
	c1, c2 := top.Clients[0], top.Clients[1]
	counts := &accepts{}
	deny := fmt.Sprintf("deny = [%q]", c2.Addrs4[0].String()+"/32")
	tcpSvc := guarded{Name: "acl", Listen: netip.AddrPortFrom(vip4, 7311), Backends: backendAddrs(t, top, 7311, counts),
		Lines: []string{`allow = ["10.77.0.0/16", "fd00:77::/32"]`, deny}}
	b := top.Backends[0]
	udpBackend := netip.AddrPortFrom(b.Addr4, 7312)
	var udpCount udpCounter
	udpCount.start(t, b.NS, b.Name, udpBackend)
	udpSvc := guarded{Name: "acludp", Protocol: "udp", Listen: netip.AddrPortFrom(vip4, 7312), Backends: []netip.AddrPort{udpBackend},
		Lines: []string{deny, `proxy_protocol = "v2"`}}
	startLB(t, top.LB, guardedConf(tcpSvc, udpSvc))

	holdConn(t, c1.NS, c1.Addrs4[0], tcpSvc.Listen).echoLine(t, "allowed")
	for range 3 {
		closedAtOnce(t, c2.NS, c2.Addrs4[0], tcpSvc.Listen, "let me in\n")
	}
	if n := counts.get("b1"); n != 1 {
		t.Errorf("backend accepted %d connections; want 1, the allowed client's", n)
	}

	ok := newUDPClient(t, c1.NS, c1.Addrs4[0], udpSvc.Listen)
	reply, err := ok.exchangeRaw([]byte("hello"), udpIOTimeout)
	if err != nil {
		t.Fatalf("allowed UDP client: %v", err)
	}
	if want := b.Name + " " + ok.src.String(); reply != want {
		t.Errorf("UDP backend answered %q: want %q (the client's address from the PROXY v2 prefix)", reply, want)
	}
	denied := newUDPClient(t, c2.NS, c2.Addrs4[0], udpSvc.Listen)
	for i := range 3 {
		if reply, err := denied.exchangeRaw([]byte("x"), 300*time.Millisecond); err == nil {
			t.Fatalf("denied UDP client got a reply %d: %q", i, reply)
		}
	}
	if n := udpCount.got.Load(); n != 1 {
		t.Errorf("UDP backend received %d datagrams; want 1, the allowed client's", n)
	}
	tcp, _ := rejections(t, top.LB, "acl")
	_, drops := rejections(t, top.LB, "acludp")
	if tcp["denied"] != 3 || drops["denied"] != 3 {
		t.Errorf("rejected %v, udp drops %v: want 3 denied each", tcp, drops)
	}
}

// exchangeRaw sends data and returns the reply as text.
func (c *udpClient) exchangeRaw(data []byte, timeout time.Duration) (string, error) {
	if _, err := c.conn.WriteToUDPAddrPort(data, c.dst); err != nil {
		return "", err
	}
	buf := make([]byte, 1<<16)
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	n, _, err := c.conn.ReadFromUDPAddrPort(buf)
	return string(buf[:n]), err
}

// A PROXY protocol reader of the tests' own, independent of l4lb's.

var v2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// parseProxyV2 parses a v2 header at the start of b and returns the
// source address and the header length.
func parseProxyV2(b []byte) (netip.AddrPort, int, error) {
	if len(b) < 16 || string(b[:12]) != string(v2Sig) || b[12] != 0x21 {
		return netip.AddrPort{}, 0, errors.New("no v2 PROXY header")
	}
	n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
	if len(b) < n {
		return netip.AddrPort{}, 0, errors.New("v2 header cut short")
	}
	switch b[13] >> 4 {
	case 1:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[16:20])), binary.BigEndian.Uint16(b[24:26])), n, nil
	case 2:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[16:32])), binary.BigEndian.Uint16(b[48:50])), n, nil
	}
	return netip.AddrPort{}, 0, fmt.Errorf("v2 family %x", b[13])
}

// readProxy reads a v1 or v2 header from r and returns the source.
func readProxy(r *bufio.Reader) (netip.AddrPort, error) {
	first, err := r.Peek(12)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if string(first) == string(v2Sig) {
		head, err := r.Peek(16)
		if err != nil {
			return netip.AddrPort{}, err
		}
		whole, err := r.Peek(16 + int(binary.BigEndian.Uint16(head[14:16])))
		if err != nil {
			return netip.AddrPort{}, err
		}
		src, n, err := parseProxyV2(whole)
		r.Discard(n)
		return src, err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, err
	}
	f := strings.Fields(line)
	if len(f) != 6 || f[0] != "PROXY" || !strings.HasSuffix(line, "\r\n") {
		return netip.AddrPort{}, fmt.Errorf("v1 header %q", line)
	}
	port, err := strconv.ParseUint(f[4], 10, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	a, err := netip.ParseAddr(f[2])
	return netip.AddrPortFrom(a, uint16(port)), err
}

// proxyEcho is a backend that requires a PROXY header, greets with
// "backend NAME from SRC" and echoes.
func proxyEcho(name string, c *net.TCPConn) error {
	r := bufio.NewReader(c)
	src, err := readProxy(r)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(c, "backend %s from %s\n", name, src); err != nil {
		return err
	}
	_, err = io.Copy(c, r)
	return err
}

// TestProtectProxyProtocol: l4lb sends v1 and v2 headers that a backend
// parses to the real client address; behind a trusted balancer it reads
// the header (v1 or v2), and routes, filters and reports by the address
// it carries; untrusted sources, malformed and slow headers are closed.
func TestProtectProxyProtocol(t *testing.T) {
	top := newTopology(t, 2, 1, 1)
	c1, c2 := top.Clients[0], top.Clients[1]
	counts := &accepts{}
	b := top.Backends[0]
	svc := func(name string, port uint16, lines ...string) guarded {
		addr := netip.AddrPortFrom(b.Addr4, port)
		startBackend(t, b.NS, b.Name, addr, counts.wrap(proxyEcho))
		return guarded{Name: name, Listen: netip.AddrPortFrom(vip4, port), Backends: []netip.AddrPort{addr}, Lines: lines}
	}
	v1 := svc("ppv1", 7321, `proxy_protocol = "v1"`)
	v2 := svc("ppv2", 7322, `proxy_protocol = "v2"`)
	behind := svc("behind", 7323, `proxy_protocol = "v1"`, `accept_proxy_protocol = true`,
		fmt.Sprintf("trusted_proxies = [%q]", c1.Addrs4[0].String()), `proxy_protocol_timeout = "1s"`,
		`deny = ["203.0.113.66"]`, "max_connections_per_source = 1")
	startLB(t, top.LB, guardedConf(v1, v2, behind))

	greet := func(c *net.TCPConn) string {
		c.SetDeadline(time.Now().Add(ioTimeout))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatalf("greeting: %v (%q)", err, line)
		}
		return strings.TrimSuffix(line, "\n")
	}
	for _, s := range []guarded{v1, v2} {
		c, err := dialFrom(c1.NS, c1.Addrs4[0], s.Listen)
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("backend b1 from %s", localAddrPort(c))
		if got := greet(c); got != want {
			t.Errorf("%s: backend said %q, want %q", s.Name, got, want)
		}
		c.Close()
	}

	// From the trusted balancer: a v1 and a v2 header with another
	// client's address each. The data after the header gets through.
	v2hdr := append(append([]byte{}, v2Sig...), 0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 77, 0, 1, 0x15, 0xb3, 0x1c, 0x9b)
	for _, header := range []string{"PROXY TCP4 203.0.113.9 10.77.0.1 5555 7323\r\n", string(v2hdr)} {
		c, err := dialFrom(c1.NS, c1.Addrs4[0], behind.Listen)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(header + "ping\n"))
		r := bufio.NewReader(c)
		c.SetDeadline(time.Now().Add(ioTimeout))
		got, err := r.ReadString('\n')
		echo, err2 := r.ReadString('\n')
		want := "backend b1 from 203.0.113.9:5555\n"
		if header[0] != 'P' {
			want = "backend b1 from 198.51.100.9:5555\n"
		}
		if err != nil || err2 != nil || got != want || echo != "ping\n" {
			t.Errorf("behind a balancer: got %q %q (%v %v), want %q and the echo", got, echo, err, err2, want)
		}
		c.Close()
	}

	before := counts.get("b1")
	valid := "PROXY TCP4 203.0.113.10 10.77.0.1 5555 7323\r\n"
	closedAtOnce(t, c2.NS, c2.Addrs4[0], behind.Listen, valid) // untrusted
	closedAtOnce(t, c1.NS, c1.Addrs4[0], behind.Listen, "PROXY TCP4 203.0.113.10 bogus\r\n")
	closedAtOnce(t, c1.NS, c1.Addrs4[0], behind.Listen, "GET / HTTP/1.1\r\n\r\n")
	closedAtOnce(t, c1.NS, c1.Addrs4[0], behind.Listen, "PROXY TCP4 203.0.113.66 10.77.0.1 5555 7323\r\n") // denied
	// The per-source limit counts the carried address, not the balancer's.
	for _, src := range []string{"203.0.113.20", "203.0.113.21"} {
		c, err := dialFrom(c1.NS, c1.Addrs4[0], behind.Listen)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("PROXY TCP4 " + src + " 10.77.0.1 5555 7323\r\n"))
		if got := greet(c); got != "backend b1 from "+src+":5555" {
			t.Fatalf("carried source %s: %q", src, got)
		}
	}
	closedAtOnce(t, c1.NS, c1.Addrs4[0], behind.Listen, "PROXY TCP4 203.0.113.20 10.77.0.1 5556 7323\r\n")

	// A header that never ends is closed at proxy_protocol_timeout.
	start := time.Now()
	slow, err := dialFrom(c1.NS, c1.Addrs4[0], behind.Listen)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slow.Write([]byte("PROXY TCP4 203.0."))
	slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := slow.Read(make([]byte, 1))
	took := time.Since(start)
	if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) || took < time.Second || took > 3*time.Second {
		t.Errorf("slow header: read %d, %v after %v; want closed after proxy_protocol_timeout (1s)", n, err, took)
	}
	t.Logf("slow PROXY header closed after %v (proxy_protocol_timeout 1s)", took.Round(time.Millisecond))

	if got := counts.get("b1") - before; got != 2 {
		t.Errorf("backend accepted %d connections from rejected clients' attempts; want only the 2 held", got)
	}
	tcp, _ := rejections(t, top.LB, "behind")
	want := map[string]uint64{"untrusted_proxy": 1, "bad_proxy_header": 2, "denied": 1, "max_connections_per_source": 1, "proxy_header_timeout": 1}
	for k, v := range want {
		if tcp[k] != v {
			t.Errorf("rejected %s = %d, want %d (all: %v)", k, tcp[k], v, tcp)
		}
	}
}

// lingerAfterEOF is a backend that reads until the client's EOF and then
// neither writes nor closes until release is closed.
func lingerAfterEOF(release <-chan struct{}) handler {
	return func(name string, c *net.TCPConn) error {
		io.Copy(io.Discard, c)
		<-release
		return nil
	}
}

// greetCloseWriteLinger sends the greeting, closes its write side and then
// waits, reading, for the client, which never sends nor closes.
func greetCloseWriteLinger(name string, c *net.TCPConn) error {
	fmt.Fprintf(c, "backend %s\n", name)
	c.CloseWrite()
	io.Copy(io.Discard, c)
	return nil
}

// tcpClose is TCP_CLOSE in tcp_info's state.
const tcpClose = 7

// tcpState is the kernel's TCP state of c.
func tcpState(t *testing.T, c *net.TCPConn) uint8 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var state uint8
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	})
	return state
}

// halfOpenSockets lists the sockets of l4lb's namespace on port that are
// stuck half-closed.
func halfOpenSockets(t *testing.T, ns string, ports ...uint16) []string {
	t.Helper()
	out, err := runIn(ns, "ss", "-Htan", "state", "close-wait", "state", "fin-wait-2")
	if err != nil {
		t.Fatalf("ss: %v: %s", err, out)
	}
	var stuck []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		for _, p := range ports {
			if strings.Contains(line, ":"+strconv.Itoa(int(p))+" ") {
				stuck = append(stuck, line)
			}
		}
	}
	return stuck
}

// TestProtectHalfCloseTimeout: a client that half-closes while its backend
// lingers, and a backend that half-closes while its client lingers, are
// both cut at half_close_timeout; l4lb's namespace keeps no CLOSE_WAIT or
// FIN_WAIT2 socket afterwards.
func TestProtectHalfCloseTimeout(t *testing.T) {
	top := newTopology(t, 1, 1, 1)
	b := top.Backends[0]
	release := make(chan struct{})
	clientFirst := netip.AddrPortFrom(b.Addr4, 7331)
	backendFirst := netip.AddrPortFrom(b.Addr4, 7332)
	startBackend(t, b.NS, b.Name, clientFirst, lingerAfterEOF(release))
	startBackend(t, b.NS, b.Name, backendFirst, greetCloseWriteLinger)
	t.Cleanup(func() { close(release) }) // runs before the backends' cleanups
	half := `half_close_timeout = "1s"`
	s1 := guarded{Name: "clientfirst", Listen: netip.AddrPortFrom(vip4, 7331), Backends: []netip.AddrPort{clientFirst}, Lines: []string{half}}
	s2 := guarded{Name: "backendfirst", Listen: netip.AddrPortFrom(vip4, 7332), Backends: []netip.AddrPort{backendFirst}, Lines: []string{half}}
	startLB(t, top.LB, guardedConf(s1, s2))
	c := top.Clients[0]

	var wg sync.WaitGroup
	wg.Go(func() {
		conn, err := dialFrom(c.NS, c.Addrs4[0], s1.Listen)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		conn.Write([]byte("request"))
		conn.CloseWrite()
		start := time.Now()
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := conn.Read(make([]byte, 1))
		took := time.Since(start)
		if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) || took < 900*time.Millisecond || took > 4*time.Second {
			t.Errorf("client half-closed first: read %d, %v after %v; want closed after half_close_timeout (1s)", n, err, took)
		}
		t.Logf("client half-closed, backend lingering: closed after %v", took.Round(time.Millisecond))
	})
	wg.Go(func() {
		conn, err := dialFrom(c.NS, c.Addrs4[0], s2.Listen)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		r := bufio.NewReader(conn)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := readGreeting(r); err != nil {
			t.Error(err)
			return
		}
		start := time.Now()
		if _, err := r.ReadByte(); err != io.EOF {
			t.Errorf("backend's half-close not passed on: %v", err)
			return
		}
		// The client lingers: it neither sends nor closes. l4lb cuts it
		// with a reset, which moves the client's socket to CLOSE.
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if tcpState(t, conn) == tcpClose {
				took := time.Since(start)
				if took < 900*time.Millisecond {
					t.Errorf("cut after %v, before half_close_timeout", took)
				}
				t.Logf("backend half-closed, client lingering: cut after %v", took.Round(time.Millisecond))
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Error("lingering client not cut within 5s of the backend's half-close")
	})
	wg.Wait()

	var stuck []string
	for range 20 { // the cut is a reset: nothing should linger at all
		if stuck = halfOpenSockets(t, top.LB, 7331, 7332); len(stuck) == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(stuck) > 0 {
		t.Errorf("half-closed sockets left in l4lb's namespace:\n%s", strings.Join(stuck, "\n"))
	}
}

// TestProtectDescriptorExhaustion runs l4lb with RLIMIT_NOFILE 128 (via
// prlimit) and opens more clients than it has descriptors: l4lb serves
// the connections it holds, queues the rest in the kernel without
// spinning, and accepts again as soon as clients leave.
func TestProtectDescriptorExhaustion(t *testing.T) {
	const nofile, clients = 128, 300
	top := newTopology(t, 1, 1, 1)
	svc := guarded{Name: "fd", Listen: netip.AddrPortFrom(vip4, 7341), Backends: backendAddrs(t, top, 7341, nil)}
	conf := guardedConf(svc)
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := startProcess(t, top.LB, "stderr", "l4lb: ready",
		"prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), l4lbBin, "run", "-config", path)
	if p != nil {
		t.Cleanup(func() {
			if _, clean := p.stop(); !clean {
				t.Error("l4lb did not stop within its drain")
			}
			if t.Failed() {
				t.Logf("l4lb output:\n%s", p.Output())
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	var st guardedStatus
	if err := json.Unmarshal(adminGet(t, top.LB, "/status"), &st); err != nil {
		t.Fatal(err)
	}
	limit := int(st.MaxConnections)
	if limit <= 0 || limit*2 >= nofile {
		t.Fatalf("max_connections %d with RLIMIT_NOFILE %d: want a bound that leaves descriptors spare", limit, nofile)
	}
	c := top.Clients[0]

	// Fill l4lb to its bound with connections that stay open.
	var served []*held
	for range limit {
		served = append(served, holdConn(t, c.NS, c.Addrs4[0], svc.Listen))
	}
	// Then many more clients than l4lb has descriptors: they connect (the
	// kernel completes the handshake) and wait in the accept queue.
	var waiting []*net.TCPConn
	for range clients {
		conn, err := dialFrom(c.NS, c.Addrs4[0], svc.Listen)
		if err != nil {
			t.Fatalf("client %d of %d: %v", len(waiting)+1, clients, err)
		}
		waiting = append(waiting, conn)
	}
	defer func() {
		for _, w := range waiting {
			w.Close()
		}
	}()

	cpuStart, wallStart := cpuTime(t, p.cmd.Process.Pid), time.Now()
	for round := range 10 {
		for i, h := range served {
			h.echoLine(t, fmt.Sprintf("round %d conn %d", round, i))
		}
		time.Sleep(200 * time.Millisecond)
	}
	cpu, wall := cpuTime(t, p.cmd.Process.Pid)-cpuStart, time.Since(wallStart)
	waiting[0].SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := waiting[0].Read(make([]byte, 1)); n != 0 {
		t.Errorf("a client past the bound was served while the bound was reached")
	}
	t.Logf("RLIMIT_NOFILE %d: max_connections %d held and echoing, %d more clients queued; l4lb used %v CPU in %v (%.1f%%)",
		nofile, limit, clients, cpu, wall.Round(time.Millisecond), 100*cpu.Seconds()/wall.Seconds())
	// A spinning accept loop burns a whole core; 10 rounds of echoes cost
	// milliseconds.
	if cpu > wall/4 {
		t.Errorf("l4lb used %v CPU in %v while saturated: it spins", cpu, wall)
	}

	// Everyone leaves; a new client is served within 2 s.
	left := time.Now()
	for _, h := range served {
		h.conn.Close()
	}
	for _, w := range waiting {
		w.Close()
	}
	holdConn(t, c.NS, c.Addrs4[0], svc.Listen).conn.Close()
	took := time.Since(left)
	if took > 2*time.Second {
		t.Errorf("first client after the others left was served %v later; want within 2s", took)
	}
	t.Logf("after %d clients left, a new client was served in %v", limit+clients, took.Round(time.Millisecond))
	if strings.Contains(p.Output(), "panic") {
		t.Errorf("l4lb panicked")
	}
}
