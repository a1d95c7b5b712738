package l4

import (
	"bytes"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
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

// startBackend runs a server on loopback until the test ends: serve gets
// each connection in a goroutine of its own, and closes it.
func startBackend(t *testing.T, serve func(net.Conn)) netip.AddrPort {
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
			go serve(c)
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startEcho runs an echo server on loopback until the test ends.
func startEcho(t *testing.T) netip.AddrPort { return startBackend(t, echo) }

// echo writes back what c sends until it closes, then closes c. A plain
// read/write loop: io.Copy between TCP conns would splice through pipes of
// its own and confuse pipe counts.
func echo(c net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			c.Write(buf[:n])
		}
		if err != nil {
			break
		}
	}
	c.Close()
}

// startService proxies a loopback port to backends with idle timeout idle
// and returns the address clients dial.
func startService(t *testing.T, idle time.Duration, backends ...netip.AddrPort) (netip.AddrPort, *Service) {
	t.Helper()
	cfg := &config.Service{
		Name: "test", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.Maglev, HashKey: config.SourceIPPort, Workers: 1,
		ConnectTimeout: time.Second, IdleTimeout: idle, DrainTimeout: time.Second,
	}
	for _, b := range backends {
		cfg.Backends = append(cfg.Backends, config.Backend{Address: b, Weight: 1})
	}
	svc := NewService(cfg, hclog.NewNullLogger())
	return serveTest(t, svc, cfg.Listen), svc
}

// serveTest runs svc on a socket bound to listen, on the event loops, as
// the Server does, and returns the address it got.
func serveTest(t *testing.T, svc *Service, listen netip.AddrPort) netip.AddrPort {
	t.Helper()
	return serveTestOn(t, loops(), svc, listen)
}

// serveTestOn is serveTest on the loops of set.
func serveTestOn(t *testing.T, set *loopSet, svc *Service, listen netip.AddrPort) netip.AddrPort {
	t.Helper()
	lns, err := listenTCP(context.Background(), listen, 1)
	if err != nil {
		t.Fatal(err)
	}
	var running sync.WaitGroup
	acceptors := startAcceptors(set, svc, nil, lns, 0, &running)
	t.Cleanup(func() {
		closeListeners(acceptors)
		running.Wait()
		svc.Drain(time.Now())
	})
	return lns[0].addr
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, buf, err)
	}
}

func TestIdleTimeoutClosesQuietConnections(t *testing.T) {
	const idle = 300 * time.Millisecond
	addr, _ := startService(t, idle, startEcho(t))

	quiet, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	busy, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	roundTrip(t, quiet, "hello")
	lastByte := time.Now()

	// The busy connection moves a byte every idle/3 for 4 idle periods:
	// it must survive all of them.
	for range 12 {
		time.Sleep(idle / 3)
		roundTrip(t, busy, "x")
	}

	quiet.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := quiet.Read(make([]byte, 1))
	if n != 0 || (err != io.EOF && !isReset(err)) {
		t.Fatalf("quiet connection: read %d bytes, err %v; want it closed by the idle timeout", n, err)
	}
	if quietFor := time.Since(lastByte); quietFor < idle {
		t.Errorf("closed after %v of silence, before the %v idle timeout", quietFor, idle)
	}
	roundTrip(t, busy, "still here")
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// TestIdleConnectionsHoldNoPipes checks the property the splice loop is
// built for: a proxied connection that is not moving bytes holds its two
// sockets and no pipe (io.Copy's splice would hold two pipes, four
// descriptors, for the connection's life).
func TestIdleConnectionsHoldNoPipes(t *testing.T) {
	// Sizes just over one buffer end a burst on a short splice rather than
	// on EAGAIN: the direction must give the pipe back on that path too.
	for _, size := range []int{100_000, 20_000, copyBufSize + 100} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			addr, _ := startService(t, time.Minute, startEcho(t))
			before := countPipes(t)
			const conns = 50
			for range conns {
				c, err := net.Dial("tcp", addr.String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				roundTrip(t, c, strings.Repeat("z", size))
			}
			held := countPipes(t) - before
			t.Logf("%d idle proxied connections hold %d pipe descriptors", conns, held)
			// Returned pipes wait in the pool for reuse; a handful is
			// fine, one per connection is not.
			if held > 8 {
				t.Errorf("%d idle connections hold %d pipe descriptors, want a small pool", conns, held)
			}
		})
	}
}

// TestSlowReaderIsNotIdle sends a half-closed client, reading slowly but
// steadily, more than the pipe and socket buffers hold: bytes written to
// it count as activity, so neither half_close_timeout nor idle_timeout
// may cut it while it keeps reading.
func TestSlowReaderIsNotIdle(t *testing.T) {
	const total = 2 << 20
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write(make([]byte, total))
		<-done // the backend keeps its side open: only the client half-closed
	}()
	addr, svc := startService(t, time.Second, ln.Addr().(*net.TCPAddr).AddrPort())
	cfg := *svc.route.Load().cfg
	cfg.IdleTimeout = 10 * time.Second
	cfg.HalfCloseTimeout = time.Second
	svc.Update(&cfg)
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadBuffer(64 << 10)
	c.CloseWrite() // the request is sent, as HTTP/1.0 or `nc -N` clients do
	buf := make([]byte, 32<<10)
	start := time.Now()
	for got := 0; got < total; {
		time.Sleep(50 * time.Millisecond) // about 640 KB/s: a pipe's 1 MiB takes longer than half_close_timeout
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		got += n
		if err != nil {
			t.Fatalf("after %v and %d of %d bytes read steadily: %v", time.Since(start).Round(time.Millisecond), got, total, err)
		}
	}
}

func countPipes(t *testing.T) int { return countDescriptors(t, "pipe:") }

// countSockets counts the process's socket descriptors (pooled pipes
// come and go with the pool).
func countSockets(t *testing.T) int { return countDescriptors(t, "socket:") }

// dialSlowReader connects to addr with a 4 KiB receive buffer, so that
// what the client does not read soon backs up into l4lb.
func dialSlowReader(t *testing.T, addr netip.AddrPort) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096)
		})
	}}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// countDescriptors counts the process's descriptors of one kind, by the
// prefix of their /proc/self/fd link.
func countDescriptors(t *testing.T, kind string) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, kind) {
			n++
		}
	}
	return n
}

func TestRetriesNextBackendWhenFirstRefuses(t *testing.T) {
	// A port that refuses: bind then close.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusing := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	addr, svc := startService(t, time.Minute, refusing, startEcho(t))
	for range 20 {
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, "ping")
		c.Close()
	}
	for _, be := range svc.Backends() {
		st := be.Stats()
		if be.Addr() == refusing && st.Total != 0 {
			t.Errorf("refusing backend got %d connections", st.Total)
		}
		if be.Addr() != refusing && st.Total != 20 {
			t.Errorf("working backend got %d connections, want 20", st.Total)
		}
	}
}

func TestNoBackendClosesAtOnce(t *testing.T) {
	addr, svc := startService(t, time.Minute, startEcho(t))
	cfg := *svc.route.Load().cfg
	cfg.Backends = []config.Backend{{Address: cfg.Backends[0].Address, Weight: 0}}
	svc.Update(&cfg)
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("client left hanging with no backend; want it closed at once")
	}
	if svc.refused.Load() != 1 {
		t.Errorf("refused = %d, want 1", svc.refused.Load())
	}
}

// A FIN that arrives together with the last bytes must still end the
// connection: read returns the bytes and reports the EOF only on the next
// call, so after a short read the loop reads again when the event said
// EPOLLRDHUP, rather than waiting for an edge that will not come. Both
// directions, many times, since whether data and FIN land in one read is a
// matter of timing.
func TestEOFRightBehindData(t *testing.T) {
	// The backend sends a reply and closes at once: data and FIN together.
	closer, _ := startService(t, time.Minute, startBackend(t, func(c net.Conn) {
		c.Write([]byte("bye"))
		c.Close()
	}))
	echo, _ := startService(t, time.Minute, startEcho(t))
	for i := range 50 {
		c, err := net.Dial("tcp", closer.String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "bye" {
			t.Fatalf("backend closing right after its reply, try %d: got %q, %v; want \"bye\" then EOF", i, got, err)
		}

		// The client sends and half-closes at once.
		e, err := net.Dial("tcp", echo.String())
		if err != nil {
			t.Fatal(err)
		}
		e.Write([]byte("ping"))
		e.(*net.TCPConn).CloseWrite()
		e.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err = io.ReadAll(e)
		e.Close()
		if err != nil || string(got) != "ping" {
			t.Fatalf("client half-closing right after its request, try %d: got %q, %v; want the echo then EOF", i, got, err)
		}
	}
}

// TestUrgentDataDoesNotStall: a read stops at the TCP urgent mark with
// bytes still queued behind it, so that short read does not mean the
// socket is empty (EPOLLPRI says so). The bytes behind the mark must go
// through without waiting for the client's next segment.
func TestUrgentDataDoesNotStall(t *testing.T) {
	addr, _ := startService(t, time.Minute, startEcho(t))
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, "warm-up") // connection open on both sides
	rc, _ := c.SyscallConn()
	rc.Control(func(fd uintptr) {
		f := int(fd)
		unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_CORK, 1)
		unix.Send(f, []byte("ab"), 0)
		unix.Send(f, []byte("U"), unix.MSG_OOB) // urgent byte, not inline
		unix.Send(f, []byte("defgh"), 0)
		unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_CORK, 0) // one segment
	})
	want := "abdefgh" // the urgent byte is not in the stream (no SO_OOBINLINE)
	got := make([]byte, 0, 16)
	buf := make([]byte, 16)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	for len(got) < len(want) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	if string(got) != want {
		t.Fatalf("echo through l4lb after urgent data: got %q, want %q (bytes behind the urgent mark stuck in the client socket)", got, want)
	}
}

// Urgent data in the middle of a bulk transfer, once the direction
// splices: splice(2) stops at the urgent mark and never passes it (EAGAIN
// there, or 0 once the FIN is in), unlike read(2). The bytes behind the
// mark must still go through, then the FIN if one came.
func TestUrgentDataWhileSplicing(t *testing.T) {
	for _, fin := range []bool{false, true} {
		addr, _ := startService(t, time.Minute, startEcho(t))
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, "warm-up")
		// Bulk enough to switch to splice, and with the urgent byte and
		// the tail one loopback segment (corked).
		bulk := bytes.Repeat([]byte("0123456789abcdef"), 40_000/16)
		rc, _ := c.SyscallConn()
		rc.Control(func(fd uintptr) {
			f := int(fd)
			unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_CORK, 1)
			for off := 0; off < len(bulk); {
				n, err := unix.Write(f, bulk[off:])
				if err != nil && err != unix.EAGAIN {
					t.Errorf("write: %v", err)
					return
				}
				off += max(n, 0)
			}
			unix.Send(f, []byte("U"), unix.MSG_OOB) // not inline: not in the stream
			unix.Send(f, []byte("tail"), 0)
			if fin {
				unix.Shutdown(f, unix.SHUT_WR) // the FIN goes with the corked bytes
			} else {
				unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_CORK, 0)
			}
		})
		want := append(bytes.Clone(bulk), "tail"...)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		if fin {
			got, err = io.ReadAll(c)
		} else {
			got = make([]byte, len(want))
			var n int
			n, err = io.ReadFull(c, got)
			got = got[:n]
		}
		c.Close()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("FIN %v: echo of %d bulk bytes, an urgent byte and %q: got %d of %d bytes, then %v", fin, len(bulk), "tail", len(got), len(want), err)
		}
	}
}

// A direction in splice mode whose source holds bulk bytes, an urgent
// byte, a tail and the FIN, before the loop has seen EPOLLPRI (the urgent
// byte and the FIN came after the epoll_wait that brought it here):
// splice(2) stops at the mark and, the FIN being in, returns 0. That 0 is
// not the end of the stream: the tail behind the mark must go through
// before the EOF. (TestUrgentDataWhileSplicing corks the bytes, so the
// event comes first there.)
func TestSpliceZeroAtUrgentMarkIsNotEOF(t *testing.T) {
	src, writer := socketPair(t)
	dst, reader := socketPair(t)
	bulk := bytes.Repeat([]byte("0123456789abcdef"), 40_000/16)
	rc, err := writer.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		f := int(fd)
		unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_CORK, 1)
		if _, err := unix.Write(f, bulk); err != nil {
			t.Error(err)
		}
		unix.Send(f, []byte("U"), unix.MSG_OOB)
		unix.Send(f, []byte("tail"), 0)
		unix.Shutdown(f, unix.SHUT_WR)
	})
	time.Sleep(50 * time.Millisecond) // all of it in src's receive queue

	l := &eventLoop{pipes: newPipePool(), scratch: new(copyBuf)}
	c := &proxyConn{loop: l, timerIndex: -1}
	c.up.moved, c.down.moved = new(atomic.Uint64), new(atomic.Uint64)
	c.up.splicing = true // a read filled its buffer: a bulk transfer
	sf := sockFlags{readable: true, readUntilEAGAIN: true}
	df := sockFlags{writable: true}
	for i := 0; i < 100 && !c.up.shut; i++ {
		if err := c.move(&c.up, &c.down, src, dst, &sf, &df); err != nil {
			t.Fatal(err)
		}
		sf.readable, df.writable = true, true // as the next events would say
	}
	if !c.up.shut {
		t.Fatal("the direction never passed on the EOF")
	}
	reader.SetReadDeadline(time.Now().Add(2 * time.Second))
	got, err := io.ReadAll(reader)
	want := append(bytes.Clone(bulk), "tail"...)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("passed on %d bytes then %v; want %d (the bulk and %q) then EOF", len(got), err, len(want), "tail")
	}
}

// TestHalfClosedAfterBulkHoldsNoPipe: a client that uploads in bulk and
// half-closes while the backend keeps its side open: the direction that
// ended gives its pipe back, the connection keeps only its sockets.
func TestHalfClosedAfterBulkHoldsNoPipe(t *testing.T) {
	done := make(chan struct{})
	defer close(done)
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Read(buf); err != nil {
				break
			}
		}
		<-done // keeps its side open, like a server still working on the reply
	})
	addr, _ := startService(t, time.Minute, backend)
	before := countPipes(t)
	const conns = 30
	for range conns {
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte(strings.Repeat("z", 200_000)))
		c.CloseWrite()
	}
	time.Sleep(500 * time.Millisecond)
	held := countPipes(t) - before
	t.Logf("%d half-closed idle connections hold %d pipe descriptors", conns, held)
	if held > 8 {
		t.Errorf("%d half-closed idle connections hold %d pipe descriptors, want a small pool", conns, held)
	}
}

// TestConnectTimeoutTriesNextBackend: a backend whose connects hang is
// given up after connect_timeout (the event loop's timer), counted as a
// failed dial, and the client is served by the next backend.
func TestConnectTimeoutTriesNextBackend(t *testing.T) {
	slow := newSlowBackend(t)
	good := startEcho(t)
	cfg := &config.Service{Balance: config.RoundRobin, Backends: []config.Backend{
		{Address: slow.addr, Weight: 1}, {Address: good, Weight: 1}}}
	addr, svc := startProtectedService(t, cfg) // connect_timeout 1s
	var slowest time.Duration
	for i := range 2 { // round robin: at least one of the two tries the slow backend first
		start := time.Now()
		c := dialT(t, addr)
		roundTrip(t, c, "hello "+strconv.Itoa(i))
		c.Close()
		slowest = max(slowest, time.Since(start))
	}
	if slowest < 900*time.Millisecond {
		t.Errorf("slowest client served after %v: the hanging connect was not waited for until connect_timeout (1s)", slowest)
	}
	if n := backendOf(svc, slow.addr).dialFailed.Load(); n < 1 || n > 2 {
		t.Errorf("slow backend: %d failed dials counted, want 1 or 2 (once per client at most)", n)
	}
}

// TestManyConnectionsInterleaved: many connections exchanging messages at
// once share each round's reads and writes (flushRound), and the larger messages
// fill the loop's arena, so reads spill to the scratch buffer and splice.
// Every byte must arrive once and in order on its own connection.
func TestManyConnectionsInterleaved(t *testing.T) {
	addr, _ := startService(t, time.Minute, startEcho(t))
	const conns, rounds = 40, 60
	errs := make(chan error, conns)
	for i := range conns {
		go func() {
			errs <- func() error {
				c, err := net.Dial("tcp", addr.String())
				if err != nil {
					return err
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				got := make([]byte, 40<<10)
				for r := range rounds {
					// Sizes from a few bytes to past a full read (16 KiB),
					// different on each connection and round.
					size := 1 + (i*7919+r*104729)%(36<<10)
					msg := bytes.Repeat([]byte{byte(i), byte(r)}, size/2+1)[:size]
					if _, err := c.Write(msg); err != nil {
						return err
					}
					if _, err := io.ReadFull(c, got[:size]); err != nil {
						return fmt.Errorf("conn %d round %d: %w", i, r, err)
					}
					if !bytes.Equal(got[:size], msg) {
						return fmt.Errorf("conn %d round %d: %d bytes came back changed", i, r, size)
					}
				}
				return nil
			}()
		}()
	}
	for range conns {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestAcceptBatchIsBounded queues more clients than an acceptor takes in
// one round: the readiness of the listening socket must take acceptBatch
// of them, leaving the loop to handle its other events, and the loop's
// next rounds the rest, although an edge-triggered socket gives no new
// event for clients already queued.
func TestAcceptBatchIsBounded(t *testing.T) {
	cfg := &config.Service{Name: "batch", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.RoundRobin, Workers: 1, ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: time.Second,
		Backends: []config.Backend{{Address: startEcho(t), Weight: 1}}}
	svc := NewService(cfg, hclog.NewNullLogger())
	lns, err := listenTCP(context.Background(), cfg.Listen, 1)
	if err != nil {
		t.Fatal(err)
	}
	// A loop of the test's own that this goroutine drives by hand.
	l, err := newEventLoop(newPipePool())
	if err != nil {
		t.Fatal(err)
	}
	const queued = 4*acceptBatch + 10
	for range queued {
		// Connected: the client waits in the listening socket's queue.
		dialT(t, lns[0].addr)
	}
	var stopped sync.WaitGroup
	stopped.Add(1)
	a := &acceptor{loop: l, fd: lns[0].fd, addr: lns[0].addr, svc: svc, held: listener.Conn{FD: -1}, done: &stopped}
	t.Cleanup(func() {
		for _, c := range l.conns {
			if c != nil {
				c.finish(errAborted)
			}
		}
		l.stopAcceptor(a)
		stopped.Wait()
		l.file.Close()
		unix.Close(l.wakeFD)
		if l.ring != nil {
			l.ring.close()
		}
	})

	l.now = monotonicNow()
	l.startAcceptor(a) // as the socket's first readiness does
	if n := svc.accepted.Load(); n != acceptBatch {
		t.Errorf("the socket's readiness took %d of %d queued clients, want %d", n, queued, acceptBatch)
	}
	l.pollFD(0) // the loop's next rounds, until it would sleep
	if n := svc.accepted.Load(); n != queued {
		t.Errorf("%d of %d queued clients taken when the loop would sleep", n, queued)
	}
}

// TestFullClientTakesEveryByte: a backend streams messages smaller than a
// read, with gaps, so the proxy stays in read/write mode, to a client that
// reads nothing until the backend is done. The proxy's writes to the
// client then come back partial and EAGAIN, and what they left must be
// held and sent later, in order, before the FIN.
func TestFullClientTakesEveryByte(t *testing.T) {
	const msgSize, msgs = 6000, 1500 // 9 MB: more than the sockets between hold
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		msg := make([]byte, msgSize)
		for i := range msgs {
			for j := range msg {
				msg[j] = byte(i + j)
			}
			if _, err := c.Write(msg); err != nil {
				return
			}
			if i%4 == 0 {
				time.Sleep(50 * time.Microsecond)
			}
		}
	})
	addr, _ := startService(t, time.Minute, backend)
	c := dialSlowReader(t, addr)
	defer c.Close()
	time.Sleep(time.Second) // the backend writes all it can meanwhile
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != msgSize*msgs {
		t.Fatalf("client got %d bytes, want %d", len(got), msgSize*msgs)
	}
	for i := range msgs {
		for j := range msgSize {
			if got[i*msgSize+j] != byte(i+j) {
				t.Fatalf("byte %d of message %d is wrong", j, i)
			}
		}
	}
}

// TestConnectDoneBeforeItsTimerIsNoTimeout: a loop that falls behind
// (more ready events than one epoll_wait returns, or a thread starved of
// CPU, as in a heavily loaded TestRoundStress) can reach a connect's
// timer before the event that says the connect is done. The connect
// succeeded: the client is served, and nothing counts as a failed dial.
// The test makes the timer of a connect that is done due in the round
// that started it, before the loop polls again.
func TestConnectDoneBeforeItsTimerIsNoTimeout(t *testing.T) {
	backend := startEcho(t)
	addr, svc := startService(t, time.Minute, backend)
	var forced atomic.Int32
	hook := func(l *eventLoop) {
		var done []*proxyConn
		for _, c := range l.timers {
			if c.svc == svc && c.state == stateConnecting && rawPollNow(c.backend, unix.POLLOUT) != 0 {
				done = append(done, c)
			}
		}
		for _, c := range done {
			c.timerAt = l.now
			heap.Fix(&l.timers, c.timerIndex)
			forced.Add(1)
		}
	}
	testHookBeforeTimers.Store(&hook)
	defer testHookBeforeTimers.Store(nil)
	// A loopback connect is usually done when connect(2) returns; when it
	// is not, the event comes first and the client tries again.
	for i := 0; i < 50 && forced.Load() == 0; i++ {
		c := dialT(t, addr)
		roundTrip(t, c, "hello "+strconv.Itoa(i))
		c.Close()
	}
	if forced.Load() == 0 {
		t.Fatal("no connect was done by the end of the round that started it: the case was never made")
	}
	if n := backendOf(svc, backend).dialFailed.Load(); n != 0 {
		t.Errorf("%d failed dials counted for connects that succeeded", n)
	}
}

// TestResetPassesThrough: a peer that resets its connection mid-stream
// (SO_LINGER 0) must reach the other peer as a reset, in read/write mode
// (a short message) and once the direction splices (bulk). Passed on as a
// FIN, the cut stream looks complete: a client would take a truncated
// reply, a backend a truncated upload, for the whole of it.
func TestResetPassesThrough(t *testing.T) {
	for _, size := range []int{100, 300_000} {
		t.Run("backend resets after "+strconv.Itoa(size), func(t *testing.T) {
			delivered := make(chan struct{})
			backend := startBackend(t, func(c net.Conn) {
				c.Write(bytes.Repeat([]byte("b"), size))
				<-delivered
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			})
			addr, _ := startService(t, time.Minute, backend)
			c := dialT(t, addr)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, make([]byte, size)); err != nil {
				t.Fatal(err)
			}
			close(delivered)
			n, err := c.Read(make([]byte, 1))
			if !errors.Is(err, unix.ECONNRESET) {
				t.Fatalf("after the backend's reset the client read %d bytes, then %v; want a reset", n, err)
			}
		})
		t.Run("client resets after "+strconv.Itoa(size), func(t *testing.T) {
			delivered := make(chan struct{})
			backendRead := make(chan error, 1)
			backend := startBackend(t, func(c net.Conn) {
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(c, make([]byte, size)); err != nil {
					backendRead <- err
					return
				}
				close(delivered)
				_, err := c.Read(make([]byte, 1))
				backendRead <- err
			})
			addr, _ := startService(t, time.Minute, backend)
			c := dialT(t, addr)
			if _, err := c.Write(bytes.Repeat([]byte("c"), size)); err != nil {
				t.Fatal(err)
			}
			select {
			case <-delivered:
			case err := <-backendRead:
				t.Fatalf("backend reading the upload: %v", err)
			}
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			if err := <-backendRead; !errors.Is(err, unix.ECONNRESET) {
				t.Fatalf("after the client's reset the backend read %v; want a reset", err)
			}
		})
	}
}

// TestWriteFailureStillDeliversTheOtherWay: a backend answers early and
// closes with the client's upload unread (a reset, as a server does with a
// request too large). Its reply is in l4lb's backend socket, ahead of the
// reset, when l4lb's next write to the backend fails: the reply must still
// reach the client, as it would on a direct connection, and the
// connection then end with a reset. The test drives a loop of its own, so
// that the client's next bytes and the backend's reply and reset are in
// one batch of events, the client's first.
func TestWriteFailureStillDeliversTheOtherWay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l, err := newEventLoop(newPipePool())
	if err != nil {
		t.Fatal(err)
	}
	cfg := &config.Service{
		Name: "early-reply", Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: config.TCP,
		Balance: config.RoundRobin, Workers: 1, ConnectTimeout: time.Second, IdleTimeout: time.Minute, DrainTimeout: time.Second,
		Backends: []config.Backend{{Address: ln.Addr().(*net.TCPAddr).AddrPort(), Weight: 1}},
	}
	svc := NewService(cfg, hclog.NewNullLogger())
	addr := serveTestOn(t, &loopSet{loops: []*eventLoop{l}}, svc, cfg.Listen)
	// serveTestOn's cleanup needs the loop to close the listening socket;
	// it runs on its own from then on, like the package's loops.
	t.Cleanup(func() { go l.run() })

	l.pollFD(0) // takes the listening socket
	client := dialT(t, addr)
	l.pollFD(0) // accepts and dials
	backend, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	var c *proxyConn
	eventually(t, "the connection open", func() bool {
		l.pollFD(0)
		for _, conn := range l.conns {
			if conn != nil && conn.state == stateOpen {
				c = conn
			}
		}
		return c != nil
	})

	const request, more, reply = "PUT /upload", "next part", "413 request too large"
	if _, err := client.Write([]byte(request)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the request at the backend", func() bool {
		l.pollFD(0)
		return bytesToRead(t, backend) == len(request)
	})
	if _, err := client.Write([]byte(more)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the client's next bytes at l4lb", func() bool {
		n, err := unix.IoctlGetInt(c.client, unix.SIOCINQ)
		return err == nil && n == len(more)
	})
	if _, err := backend.Write([]byte(reply)); err != nil {
		t.Fatal(err)
	}
	backend.Close() // the request unread: a reset, behind the reply
	eventually(t, "the backend's reset at l4lb", func() bool {
		info, err := unix.GetsockoptTCPInfo(c.backend, unix.IPPROTO_TCP, unix.TCP_INFO)
		return err == nil && info.State == tcpClose
	})
	l.pollFD(0)

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(client)
	if string(got) != reply {
		t.Fatalf("the client got %q, then %v; want the backend's reply %q, sent before its reset", got, err, reply)
	}
	if !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("after the reply the client read %v; want the backend's reset passed on", err)
	}
}

// bytesToRead is how many bytes c's socket holds unread.
func bytesToRead(t *testing.T, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestResetComesAfterTheBytesBeforeIt: a backend resets once l4lb has
// taken everything it sent, while the client has not read it yet. A reset
// discards what a socket still has to send, so passed on at once it would
// cut off the end of those bytes; the client must read every one, then the
// reset.
func TestResetComesAfterTheBytesBeforeIt(t *testing.T) {
	const size = 1 << 20
	reset := make(chan error, 1)
	backend := startBackend(t, func(c net.Conn) {
		if _, err := c.Write(bytes.Repeat([]byte("b"), size)); err != nil {
			reset <- err
			return
		}
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			reset <- err
			return
		}
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			queued := -1
			rc.Control(func(fd uintptr) { queued = int(sendQueued(int(fd))) })
			if queued == 0 {
				break // l4lb's kernel acknowledged every byte
			}
			if time.Now().After(deadline) {
				reset <- fmt.Errorf("l4lb took all but %d of %d bytes in 5 s", queued, size)
				return
			}
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		reset <- nil
	})
	addr, _ := startService(t, time.Minute, backend)
	c := dialT(t, addr)
	if err := <-reset; err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if len(got) != size || !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("the client read %d of the %d bytes the backend sent before its reset, then %v; want all of them, then the reset", len(got), size, err)
	}
}

// TestCutConnectionEndsWithResetAtIdleTimeout: l4lb's write to the
// backend found it reset while the client, reading nothing, still had
// bytes coming. The idle timeout that ends the connection then must not
// close the client with a FIN, as though the backend had ended its
// stream: the stream was cut, and the client must see a reset.
func TestCutConnectionEndsWithResetAtIdleTimeout(t *testing.T) {
	tryUntilMade(t, "the backend's bytes reached the client before the idle timeout", cutConnectionEndsWithReset)
}

// tryUntilMade runs try, a test of a case that a machine too busy for its
// timeouts may not make (try then reports false, having checked nothing),
// until it is made, up to 5 times.
func tryUntilMade(t *testing.T, what string, try func(*testing.T) bool) {
	t.Helper()
	for range 5 {
		if try(t) || t.Failed() {
			return
		}
	}
	t.Fatalf("5 tries, and never: %s", what)
}

func cutConnectionEndsWithReset(t *testing.T) (made bool) {
	backendReset := make(chan struct{})
	// More than the client and l4lb buffer between them: l4lb holds the
	// rest and reads no more from the backend. Made before the backend
	// runs: under -race on a busy machine, making it took longer than
	// the idle timeout.
	stream := bytes.Repeat([]byte("b"), 64<<20)
	backend := startBackend(t, func(c net.Conn) {
		c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		c.Write(stream)
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		close(backendReset)
	})
	const idle = time.Second
	addr, svc := startService(t, idle, backend)
	c := dialSlowReader(t, addr)
	defer c.Close()
	<-backendReset
	// The client's bytes make l4lb write to the reset backend.
	if _, err := c.Write([]byte("more")); err != nil {
		if errors.Is(err, unix.ECONNRESET) {
			return true // l4lb read the backend's reset before it and passed it on
		}
		t.Fatal(err)
	}
	eventually(t, "the connection ended by the idle timeout", func() bool { return svc.openConnections() == 0 })
	if svc.Backends()[0].Stats().BytesToCli == 0 {
		return false // the backend wrote nothing in time: nothing was cut
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("the client read %d bytes, then %v; want a reset: the backend's stream was cut (%+v)", len(got), err, svc.Backends()[0].Stats())
	}
	return true
}

// TestIdleTimeoutWithBytesHeldResets: a client that stops reading while
// l4lb still holds bytes for it is cut by the idle timeout, and those
// bytes are dropped. A FIN behind what the client did get would tell it
// the stream ended there; it must see a reset.
func TestIdleTimeoutWithBytesHeldResets(t *testing.T) {
	tryUntilMade(t, "l4lb held bytes for the client at the idle timeout", idleTimeoutWithBytesHeldResets)
}

func idleTimeoutWithBytesHeldResets(t *testing.T) (made bool) {
	// More than the sockets and l4lb hold; made before the backend runs
	// (see cutConnectionEndsWithReset).
	stream := bytes.Repeat([]byte("b"), 64<<20)
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		c.Write(stream)
	})
	addr, svc := startService(t, 300*time.Millisecond, backend)
	c := dialSlowReader(t, addr)
	defer c.Close()
	eventually(t, "the connection ended by the idle timeout", func() bool {
		return svc.Backends()[0].Stats().Total == 1 && svc.openConnections() == 0
	})
	if svc.Backends()[0].Stats().BytesToCli == 0 {
		return false // the backend wrote nothing before the idle timeout: l4lb held nothing
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("the client read %d bytes, then %v; want a reset: l4lb dropped the bytes it held (%+v)", len(got), err, svc.Backends()[0].Stats())
	}
	return true
}

// TestResetSocketIsClosedAtOnce: a client resets with bytes still on
// their way to it. Its socket has nobody left to take them (SIOCOUTQ still
// counts them after the reset), so l4lb must close it at once, not hold
// its descriptor until idle_timeout waiting for the bytes to be taken.
func TestResetSocketIsClosedAtOnce(t *testing.T) {
	backend := startBackend(t, func(c net.Conn) {
		defer c.Close()
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		c.Write(bytes.Repeat([]byte("b"), 64<<20))
	})
	addr, svc := startService(t, time.Minute, backend)
	before := countSockets(t)
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "bytes on their way to the client", func() bool { return svc.Backends()[0].Stats().BytesToCli > 0 })
	c.SetLinger(0)
	c.Close()
	eventually(t, "the connection closed", func() bool { return svc.openConnections() == 0 })
	deadline := time.Now().Add(2 * time.Second)
	for countSockets(t) > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := countSockets(t); n > before {
		t.Fatalf("2 s after the client's reset l4lb holds %d more sockets than before the connection", n-before)
	}
}

// TestStuckResetIsLookedAtRarely: a socket waiting to be reset after its
// peer takes what it still has to send (closeWithReset) may wait for
// idle_timeout when that peer reads nothing. Each look at its send queue
// costs two system calls, so the looks must thin out while nothing moves,
// not come every resetRecheck (10 ms: 150 of them in the 1.5 s watched).
func TestStuckResetIsLookedAtRarely(t *testing.T) {
	backend := startBackend(t, func(c net.Conn) {
		c.Write(bytes.Repeat([]byte("b"), 256<<10))
		time.Sleep(100 * time.Millisecond) // l4lb takes it all meanwhile
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
	addr, _ := startService(t, time.Minute, backend)
	client := dialSlowReader(t, addr)
	defer client.Close()
	clientAddr := client.LocalAddr().(*net.TCPAddr).AddrPort()

	var waiting, looks atomic.Int32
	hook := func(l *eventLoop) {
		for _, r := range l.resetting {
			sa, err := unix.Getpeername(r.fd)
			if in4, ok := sa.(*unix.SockaddrInet4); !ok || err != nil ||
				netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)) != clientAddr {
				continue
			}
			waiting.Store(1)
			if r.next <= l.now {
				looks.Add(1) // resetSent looks at it in this round
			}
		}
	}
	testHookBeforeTimers.Store(&hook)
	defer testHookBeforeTimers.Store(nil)
	for deadline := time.Now().Add(5 * time.Second); waiting.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the client's socket never waited to be reset: the backend's reset did not end the connection with bytes queued for the client")
		}
	}
	looks.Store(0)
	time.Sleep(1500 * time.Millisecond)
	if n := looks.Load(); n < 2 || n > 15 {
		t.Errorf("a socket whose peer reads nothing was looked at %d times in 1.5 s; want a few (the pause doubling from 10 ms to 1 s)", n)
	}
}

// TestMessagesAllocateNothing: a message through an open connection, both
// ways, allocates nothing in l4lb's event loop: the data path's garbage
// would be collected on the loops' cores, between messages. The count is
// of allocations made under the loop's and the connection's methods, from
// the heap profile: a count of the whole process's (testing.AllocsPerRun)
// also takes in what earlier tests left running, health checkers among
// them, and on a busy machine that came to one allocation per message.
func TestMessagesAllocateNothing(t *testing.T) {
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1
	addr, _ := startService(t, time.Minute, startEcho(t))
	c := dialT(t, addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	msg, echoed := []byte("ping"), make([]byte, 4)
	roundTrip(t, c, "warm up")
	const messages = 2000
	before := dataPathAllocs()
	for range messages {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, echoed); err != nil {
			t.Fatal(err)
		}
	}
	// A few may come with the machine's load: a write the client's
	// socket does not take whole holds the rest in a pooled buffer, which
	// a collection may have emptied. One per message, or per hundred,
	// is a cost of the data path.
	if n := dataPathAllocs() - before; n >= messages/100 {
		t.Errorf("%d allocations in the event loop for %d message round trips, want next to none", n, messages)
	}
}

// dataPathAllocs counts the objects allocated so far with an event loop's
// or a proxied connection's method on the stack, as the heap profile
// (MemProfileRate 1) has them once a collection has run.
func dataPathAllocs() int64 {
	runtime.GC()
	runtime.GC() // the profile is as of the last completed cycle
	records := make([]runtime.MemProfileRecord, 1024)
	for {
		n, ok := runtime.MemProfile(records, true)
		if ok {
			records = records[:n]
			break
		}
		records = make([]runtime.MemProfileRecord, n+256)
	}
	var total int64
	for _, r := range records {
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			if strings.HasPrefix(f.Function, "github.com/l4lb/l4lb/l4.(*eventLoop).") ||
				strings.HasPrefix(f.Function, "github.com/l4lb/l4lb/l4.(*proxyConn).") {
				total += r.AllocObjects
				break
			}
			if !more {
				break
			}
		}
	}
	return total
}
