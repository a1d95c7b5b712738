package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nsPrefix starts the name of every namespace these tests create; TestMain
// removes leftovers by it.
const nsPrefix = "l4t-"

// The service addresses, on the lb namespace's loopback. Every address in
// these tests lives only inside namespaces the test created, so fixed private
// addresses cannot clash with the host's.
var (
	vip4 = netip.MustParseAddr("10.77.0.1")
	vip6 = netip.MustParseAddr("fd00:77::1")
)

const dialTimeout = 5 * time.Second

// topology is one lb namespace with client and backend namespaces, each
// joined to lb by a veth pair on its own subnets (see the package doc).
type topology struct {
	LB       string
	Clients  []*clientNS
	Backends []*backendNS
}

// clientNS is a client namespace. Its addresses are all on one link; a
// client picks its source address by binding it.
type clientNS struct {
	NS     string
	Addrs4 []netip.Addr
	Addrs6 []netip.Addr
}

// backendNS is a backend namespace with one address per family.
type backendNS struct {
	Name  string // b1, b2, ...: what the echo backends answer with
	NS    string
	Addr4 netip.Addr
	Addr6 netip.Addr
}

// newTopology creates an lb namespace, clients client namespaces with
// addrsPerClient addresses of each family, and backends backend
// namespaces. Cleanup deletes them all, which also deletes their veths.
func newTopology(t *testing.T, clients, addrsPerClient, backends int) *topology {
	t.Helper()
	if clients > 200 || backends > 200 || addrsPerClient > 250 {
		t.Fatalf("topology too large: %d clients, %d addresses each, %d backends", clients, addrsPerClient, backends)
	}
	prefix := fmt.Sprintf("%s%d-%s", nsPrefix, os.Getpid(), sanitize(t.Name()))
	top := &topology{LB: addNetns(t, prefix+"-lb")}
	ipBatch(t, top.LB,
		"addr add "+vip4.String()+"/32 dev lo",
		"addr add "+vip6.String()+"/128 dev lo",
	)

	for i := 1; i <= clients; i++ {
		c := &clientNS{NS: addNetns(t, fmt.Sprintf("%s-c%d", prefix, i))}
		lb4 := netip.AddrFrom4([4]byte{10, 77, byte(i), 1})
		lb6 := netip.MustParseAddr(fmt.Sprintf("fd00:77:%x::1", i))
		link(t, top.LB, fmt.Sprintf("c%d", i), []string{lb4.String() + "/24", lb6.String() + "/64"}, c.NS)
		cmds := []string{"link set eth0 up"}
		for k := 2; k < 2+addrsPerClient; k++ {
			a4 := netip.AddrFrom4([4]byte{10, 77, byte(i), byte(k)})
			a6 := netip.MustParseAddr(fmt.Sprintf("fd00:77:%x::%x", i, k))
			c.Addrs4 = append(c.Addrs4, a4)
			c.Addrs6 = append(c.Addrs6, a6)
			cmds = append(cmds, "addr add "+a4.String()+"/24 dev eth0", "addr add "+a6.String()+"/64 dev eth0")
		}
		cmds = append(cmds, "route add default via "+lb4.String(), "route add ::/0 via "+lb6.String())
		ipBatch(t, c.NS, cmds...)
		top.Clients = append(top.Clients, c)
	}

	for j := 1; j <= backends; j++ {
		b := &backendNS{
			Name:  fmt.Sprintf("b%d", j),
			NS:    addNetns(t, fmt.Sprintf("%s-b%d", prefix, j)),
			Addr4: netip.AddrFrom4([4]byte{10, 78, byte(j), 2}),
			Addr6: netip.MustParseAddr(fmt.Sprintf("fd00:78:%x::2", j)),
		}
		lb4 := netip.AddrFrom4([4]byte{10, 78, byte(j), 1})
		lb6 := netip.MustParseAddr(fmt.Sprintf("fd00:78:%x::1", j))
		link(t, top.LB, "b"+fmt.Sprint(j), []string{lb4.String() + "/24", lb6.String() + "/64"}, b.NS)
		ipBatch(t, b.NS,
			"link set eth0 up",
			"addr add "+b.Addr4.String()+"/24 dev eth0",
			"addr add "+b.Addr6.String()+"/64 dev eth0",
		)
		top.Backends = append(top.Backends, b)
	}
	top.resolveNeighbours(t)
	return top
}

// resolveNeighbours makes one round trip over every link, both families, so
// that every neighbour entry a test uses is resolved before it sends. While
// an entry resolves, the kernel queues the packets sent to it and, on the
// answer, flushes the queue while new packets from another CPU already go
// straight out: the first datagrams of a flow would arrive out of order
// before l4lb ever saw them.
func (top *topology) resolveNeighbours(t *testing.T) {
	t.Helper()
	roundTrip := func(ns string, to netip.Addr) {
		// Nothing listens on closedPort: the answer is a RST.
		const closedPort = 9
		err := inNetns(ns, func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(to, closedPort).String(), dialTimeout)
			if err == nil {
				c.Close()
			}
			return err
		})
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("%s to %s: want a refused connection as a round trip, got %v", ns, to, err)
		}
	}
	for _, c := range top.Clients {
		roundTrip(c.NS, vip4)
		roundTrip(c.NS, vip6)
	}
	for _, b := range top.Backends {
		roundTrip(top.LB, b.Addr4)
		roundTrip(top.LB, b.Addr6)
	}
}

// backendByAddr returns the backend namespace that owns a, or nil.
func (top *topology) backendByAddr(a netip.Addr) *backendNS {
	for _, b := range top.Backends {
		if b.Addr4 == a || b.Addr6 == a {
			return b
		}
	}
	return nil
}

// addNetns creates namespace name with lo up and deletes it at cleanup.
func addNetns(t *testing.T, name string) string {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	// Duplicate address detection would leave every IPv6 address, the
	// link-local ones included, tentative for a second or so after its link
	// comes up, and neighbour discovery stalls meanwhile: turn it off for
	// the links created from now on. /proc/sys/net shows the namespace of
	// the thread that opens it.
	err := inNetns(name, func() error {
		for _, conf := range []string{"all", "default"} {
			path := "/proc/sys/net/ipv6/conf/" + conf + "/accept_dad"
			if err := os.WriteFile(path, []byte("0"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("netns %s: %v", name, err)
	}
	ipBatch(t, name, "link set lo up")
	return name
}

// link creates a veth pair: lbDev in the lb namespace with addrs, up, and
// eth0 in peerNS, left down for the caller to address and bring up.
func link(t *testing.T, lbNS, lbDev string, addrs []string, peerNS string) {
	t.Helper()
	cmds := []string{"link add " + lbDev + " type veth peer name eth0 netns " + peerNS}
	for _, a := range addrs {
		cmds = append(cmds, "addr add "+a+" dev "+lbDev)
	}
	ipBatch(t, lbNS, append(cmds, "link set "+lbDev+" up")...)
}

// ipBatch runs ip commands (without the leading "ip") inside namespace ns.
func ipBatch(t *testing.T, ns string, cmds ...string) {
	t.Helper()
	cmd := exec.Command("ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s -batch:\n%s\n: %v: %s", ns, strings.Join(cmds, "\n"), err, out)
	}
}

// sanitize turns a test name into something short that is safe in a
// namespace name.
func sanitize(name string) string {
	b := []byte(name)
	for i, c := range b {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			b[i] = '-'
		}
	}
	if len(b) > 40 {
		b = b[:40]
	}
	return string(b)
}

// inNetns runs fn on an OS thread that has joined network namespace ns.
// Sockets that fn creates stay in ns for their whole life, whichever thread
// uses them later, so fn should only create sockets: goroutines it starts run
// on other threads, in the original namespace.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The goroutine stays locked unless its thread is back in its own
		// namespace: a locked thread is discarded when its goroutine exits,
		// so a thread stuck in ns never runs other goroutines.
		runtime.LockOSThread()
		errc <- runLocked(ns, fn)
	}()
	return <-errc
}

func runLocked(ns string, fn func() error) error {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return err
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join("/run/netns", ns))
	if err != nil {
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("enter netns %s: %w", ns, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return errors.Join(fnErr, fmt.Errorf("leave netns %s: %w", ns, err))
	}
	runtime.UnlockOSThread()
	return fnErr
}

// listenIn opens a TCP listener on addr inside namespace ns.
func listenIn(ns string, addr netip.AddrPort) (net.Listener, error) {
	var ln net.Listener
	err := inNetns(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	return ln, err
}

// dialFrom connects from src (any port) inside namespace ns to dst.
func dialFrom(ns string, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	var c net.Conn
	err := inNetns(ns, func() error {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)),
			Timeout:   dialTimeout,
		}
		var err error
		c, err = d.DialContext(context.Background(), "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", dst, src, err)
	}
	return c.(*net.TCPConn), nil
}

// localAddrPort is c's local address with IPv4 unmapped, as the server
// sees it.
func localAddrPort(c net.Conn) netip.AddrPort {
	ap := c.LocalAddr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
