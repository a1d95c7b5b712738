package l4

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

// L4LB_TEST_NO_IO_URING=1 runs the package's tests with the event loops
// reading and writing with read(2) and write(2), the path taken where
// io_uring is unavailable (`make test` runs the tests once more that way).
func TestMain(m *testing.M) {
	if os.Getenv("L4LB_TEST_NO_IO_URING") == "1" {
		ioRingWanted = false
	}
	os.Exit(m.Run())
}

// The loops batch their writes exactly when the run asks them to: a
// machine where io_uring is unavailable must say so, not pass silently on
// the fallback path.
func TestIORingAsConfigured(t *testing.T) {
	batching, err := IOURing()
	if ioRingWanted && !batching {
		t.Fatalf("io_uring is unavailable here (%v): the loops read and write one system call each. Set L4LB_TEST_NO_IO_URING=1 to test that path alone.", err)
	}
	if !ioRingWanted && batching {
		t.Fatal("L4LB_TEST_NO_IO_URING=1, yet the loops have an io_uring")
	}
}

// socketPair returns the raw non-blocking descriptor of a loopback TCP
// client and the server side's net.Conn.
func socketPair(t *testing.T) (int, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.(*net.TCPConn).File()
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fd, true)
	t.Cleanup(func() { unix.Close(fd); s.Close() })
	return fd, s
}

// The ring itself, whatever path the loops take in this run: a machine
// without io_uring fails here, as in TestIORingAsConfigured.
func TestIORingMovesEachAndReportsEach(t *testing.T) {
	r, err := newIORing(4) // fewer entries than sends: sendAll goes in parts
	if err != nil {
		t.Fatalf("io_uring unavailable: %v", err)
	}
	const n = 7
	var sends []pendingOp
	var peers []net.Conn
	for i := range n {
		fd, peer := socketPair(t)
		peers = append(peers, peer)
		sends = append(sends, pendingOp{fd: fd, buf: bytes.Repeat([]byte{byte('a' + i)}, 100+i), res: resUnset})
	}
	if err := r.run(sends, uringOpSend); err != nil {
		t.Fatal(err)
	}
	for i, s := range sends {
		if int(s.res) != len(s.buf) {
			t.Fatalf("send %d: res %d, want %d", i, s.res, len(s.buf))
		}
		got := make([]byte, len(s.buf))
		peers[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := peers[i].Read(got); err != nil || !bytes.Equal(got, s.buf) {
			t.Fatalf("peer %d got %q, %v", i, got, err)
		}
	}

	// Reads: the peers answer; the ring reads each answer into its own
	// buffer, and says EAGAIN for a socket with nothing to read.
	for i, peer := range peers {
		peer.Write([]byte{byte('A' + i)})
	}
	recvs := make([]pendingOp, n)
	for i := range recvs {
		recvs[i] = pendingOp{fd: sends[i].fd, buf: make([]byte, 16), res: resUnset}
	}
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; i < n; {
		if err := r.run(recvs[i:i+1], uringOpRecv); err != nil {
			t.Fatal(err)
		}
		switch res := recvs[i].res; {
		case res == -int32(unix.EAGAIN) && time.Now().Before(deadline):
			time.Sleep(time.Millisecond) // not there yet
		case res != 1 || recvs[i].buf[0] != byte('A'+i):
			t.Fatalf("recv %d: res %d, byte %q", i, res, recvs[i].buf[0])
		default:
			i++
		}
	}
	if err := r.run(recvs, uringOpRecv); err != nil {
		t.Fatal(err)
	}
	for i := range recvs {
		if recvs[i].res != -int32(unix.EAGAIN) {
			t.Fatalf("recv %d from an empty socket: res %d, want EAGAIN", i, recvs[i].res)
		}
	}

	// A full socket: the ring says EAGAIN (or how much fit) and never
	// waits; everything it reports sent arrives, once.
	fd, peer := socketPair(t)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4096)
	chunk := bytes.Repeat([]byte{'x'}, 64<<10)
	sent, sawEAGAIN := 0, false
	for range 1000 {
		s := []pendingOp{{fd: fd, buf: chunk, res: resUnset}}
		if err := r.run(s, uringOpSend); err != nil {
			t.Fatal(err)
		}
		if s[0].res == -int32(unix.EAGAIN) {
			sawEAGAIN = true
			break
		}
		if s[0].res < 0 {
			t.Fatalf("send: errno %d", -s[0].res)
		}
		sent += int(s[0].res)
	}
	if !sawEAGAIN {
		t.Fatalf("a socket nobody reads took %d bytes without EAGAIN", sent)
	}
	unix.Shutdown(fd, unix.SHUT_WR)
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got int
	buf := make([]byte, 64<<10)
	for {
		k, err := peer.Read(buf)
		got += k
		if err != nil {
			break
		}
	}
	if got != sent {
		t.Fatalf("peer received %d bytes, the ring reported %d sent", got, sent)
	}
}

// lockedBuffer collects a logger's output from the loop's goroutine.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// A ring that fails at run time: the connection whose read it held ends
// (its bytes could otherwise be read twice or lost), the failure is logged,
// and the loop serves on with read(2) and write(2).
func TestBrokenRingEndsItsConnectionsAndLoopGoesOn(t *testing.T) {
	// A loop of the test's own, so that the package's loops keep their
	// rings. It lives as long as the test binary, like the others.
	l, err := newEventLoop(newPipePool())
	if err != nil {
		t.Fatal(err)
	}
	if l.ring == nil { // L4LB_TEST_NO_IO_URING: this test needs one anyway
		if l.ring, err = newIORing(ioRingEntries); err != nil {
			t.Fatalf("io_uring unavailable: %v", err)
		}
		l.arena = make([]byte, roundArenaSize)
	}
	ringFD := l.ring.fd
	go l.run()

	var logs lockedBuffer
	cfg := &config.Service{
		Name: "broken-ring", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.Maglev, HashKey: config.SourceIPPort, Workers: 1,
		ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: time.Second,
		Backends: []config.Backend{{Address: startEcho(t), Weight: 1}},
	}
	svc := NewService(cfg, hclog.New(&hclog.LoggerOptions{Output: &logs}))
	addr := serveTestOn(t, &loopSet{loops: []*eventLoop{l}}, svc, cfg.Listen)

	before, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	roundTrip(t, before, "through the ring")

	// Break the ring: its descriptor now names /dev/null, so the next
	// io_uring_enter fails, as a ring the kernel stopped serving would.
	devNull, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(devNull)
	if err := unix.Dup3(devNull, ringFD, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}

	if _, err := before.Write([]byte("lost with the ring")); err != nil {
		t.Fatal(err)
	}
	before.SetReadDeadline(time.Now().Add(5 * time.Second))
	// Reset, not closed: a clean EOF would tell the client its stream
	// ended whole.
	if n, err := before.Read(make([]byte, 64)); !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("the connection whose read the broken ring held: read %d bytes, %v; want it reset", n, err)
	}
	if !strings.Contains(logs.String(), "io_uring failed") {
		t.Fatalf("no log line about the broken ring; the log:\n%s", logs.String())
	}

	after, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	for i := range 20 {
		roundTrip(t, after, strings.Repeat(string(rune('a'+i)), 1+i*1000))
	}
}
