// Command udpload is the UDP load tool of scripts/bench-udp.sh: an echo
// backend and a request/response client, on loopback addresses only.
//
//	udpload echo -listen 127.0.0.1:18001                    # until SIGTERM or -lifetime
//	udpload client -target 127.0.0.1:18101 -flows 32 -window 4 -size 64 -duration 5s
//
// The client opens -flows sockets (distinct source ports), each connected
// to a target (several -target addresses are used in turn, one per flow),
// keeps -window datagrams outstanding per flow, and prints one line:
//
//	replies_per_s=182345 sent=... received=... loss_pct=0.000 p50_us=41.2 p99_us=180.3
//
// Each datagram carries its flow's sequence number and send time; the echo
// returns it unchanged, so the client measures the round trip. A flow that
// gets no reply for -loss-timeout counts its outstanding datagrams as lost
// and refills its window, so loss never stalls the run. The run is bounded:
// -warmup, then -duration, then -grace for late replies, then exit.
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/internal/mmsg"

	"github.com/l4lb/l4lb/internal/loopback"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "echo":
		err = runEcho(os.Args[2:])
	case "client":
		err = runClient(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "udpload:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: udpload echo -listen ADDR | udpload client -target ADDR[,ADDR...] [flags]")
	os.Exit(2)
}

// ---------------------------------------------------------------- echo ---

// echoBatch is how many datagrams the echo moves per recvmmsg/sendmmsg:
// enough to amortise the system call under load, small enough to keep the
// replies of one batch from waiting long behind each other.
const echoBatch = 32

func runEcho(args []string) error {
	fs := flag.NewFlagSet("echo", flag.ExitOnError)
	listen := fs.String("listen", "", "IP:port to echo on (loopback)")
	lifetime := fs.Duration("lifetime", 30*time.Minute, "exit after this long whatever happens")
	fs.Parse(args)
	ap, err := loopback.ParseAddrPort(*listen)
	if err != nil {
		return err
	}
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return err
	}
	for _, opt := range []int{unix.SO_RCVBUF, unix.SO_SNDBUF} {
		if err := setsockopt(c, opt, 4<<20); err != nil {
			return err
		}
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		select {
		case <-stop:
		case <-time.After(*lifetime):
		}
		c.Close()
	}()
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	b := mmsg.NewBatch(echoBatch, 65536, ap.Addr().Is6())
	for {
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, rerr = b.Recv(int(fd))
			return rerr != unix.EAGAIN
		})
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		if rerr != nil {
			continue // an ICMP error of an earlier reply and the like
		}
		for i := range n {
			b.SetAddr(i, b.Addr(i))
			b.Bufs[i] = b.Bufs[i][:b.Lens[i]]
		}
		sent := 0
		rc.Write(func(fd uintptr) bool {
			for sent < n {
				k, err := b.Send(int(fd), sent, n, false)
				sent += k
				switch {
				case err == unix.EAGAIN:
					return false // wait for buffer space
				case err != nil:
					sent++ // drop the datagram that failed, send the rest
				}
			}
			return true
		})
		b.ResetBufs()
	}
}

func setsockopt(c *net.UDPConn, opt, v int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, v) }); err != nil {
		return err
	}
	return serr
}

// -------------------------------------------------------------- client ---

// hist is a log-linear latency histogram: 64 sub-buckets per power of two
// of nanoseconds, so a percentile is within 1.6% of the true value.
type hist [64 * 64]uint64

func (h *hist) add(ns int64) {
	if ns < 1 {
		ns = 1
	}
	v := uint64(ns)
	e := bits.Len64(v) // v in [2^(e-1), 2^e)
	var sub uint64
	if e > 7 {
		sub = (v >> (e - 7)) & 63
	} else {
		sub = (v << (7 - e)) & 63
	}
	h[e*64+int(sub)]++
}

// quantile returns the value in ns below which q of the samples fall.
func (h *hist) quantile(q float64) float64 {
	var total uint64
	for _, c := range h {
		total += c
	}
	if total == 0 {
		return math.NaN()
	}
	want := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i, c := range h {
		seen += c
		if seen >= want && c > 0 {
			e, sub := i/64, i%64
			// The bucket's midpoint.
			lo := math.Ldexp(1+float64(sub)/64, e-1)
			return lo * (1 + 1.0/128)
		}
	}
	return math.NaN()
}

type flowStats struct {
	sent, received, late, bad uint64
	h                         hist
}

func runClient(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	targets := fs.String("target", "", "IP:port[,IP:port...] to send to (loopback); flow i uses target i mod count")
	flows := fs.Int("flows", 32, "flows: sockets with distinct source ports")
	window := fs.Int("window", 4, "datagrams outstanding per flow")
	size := fs.Int("size", 64, "datagram payload bytes (16-65507)")
	duration := fs.Duration("duration", 5*time.Second, "measured time")
	warmup := fs.Duration("warmup", 500*time.Millisecond, "time before the measurement starts")
	grace := fs.Duration("grace", 200*time.Millisecond, "time after the sends stop to wait for late replies")
	lossTimeout := fs.Duration("loss-timeout", 100*time.Millisecond, "a flow without a reply for this long counts its outstanding datagrams lost")
	fresh := fs.Bool("fresh", false, "each flow sends each datagram from a new socket (a new source port) and waits for its reply before the next, as DNS resolvers do; -window is ignored")
	fs.Parse(args)
	var to []netip.AddrPort
	for _, s := range strings.Split(*targets, ",") {
		ap, err := loopback.ParseAddrPort(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("-target: %w", err)
		}
		to = append(to, ap)
	}
	switch {
	case *flows < 1 || *flows > 10000:
		return errors.New("-flows must be 1-10000")
	case *window < 1 || *window > 1024:
		return errors.New("-window must be 1-1024")
	case *size < 16 || *size > 65507:
		return errors.New("-size must be 16-65507")
	case *duration <= 0 || *duration > 10*time.Minute:
		return errors.New("-duration must be in (0, 10m]")
	}

	conns := make([]*net.UDPConn, *flows)
	for i := range conns {
		if *fresh {
			break // each query opens its own
		}
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to[i%len(to)]))
		if err != nil {
			return err
		}
		defer c.Close()
		conns[i] = c
	}

	start := time.Now()
	var stopping atomic.Bool
	var measuring atomic.Bool
	var measured atomic.Uint64 // replies received while measuring
	stats := make([]*flowStats, *flows)
	var wg sync.WaitGroup
	for i, c := range conns {
		st := &flowStats{}
		stats[i] = st
		wg.Add(1)
		go func() {
			defer wg.Done()
			if *fresh {
				runFreshFlow(to[i%len(to)], st, *size, *lossTimeout, start, &stopping, &measuring, &measured)
				return
			}
			runFlow(c, st, *window, *size, *lossTimeout, start, &stopping, &measuring, &measured)
		}()
	}
	time.Sleep(*warmup)
	measuring.Store(true)
	t0 := time.Now()
	time.Sleep(*duration)
	measuring.Store(false)
	elapsed := time.Since(t0)
	n := measured.Load()
	stopping.Store(true)
	time.Sleep(*grace)
	for _, c := range conns {
		if c != nil {
			c.SetReadDeadline(time.Now()) // wake the readers
		}
	}
	wg.Wait()

	var total flowStats
	for _, st := range stats {
		total.sent += st.sent
		total.received += st.received
		total.late += st.late
		total.bad += st.bad
		for i, c := range st.h {
			total.h[i] += c
		}
	}
	if total.received == 0 {
		return fmt.Errorf("no replies (sent %d)", total.sent)
	}
	loss := 0.0
	if total.sent > 0 && total.sent > total.received {
		loss = 100 * float64(total.sent-total.received) / float64(total.sent)
	}
	fmt.Printf("replies_per_s=%.0f sent=%d received=%d loss_pct=%.3f p50_us=%.1f p99_us=%.1f late=%d bad=%d\n",
		float64(n)/elapsed.Seconds(), total.sent, total.received, loss,
		total.h.quantile(0.50)/1e3, total.h.quantile(0.99)/1e3, total.late, total.bad)
	return nil
}

// runFlow keeps window datagrams outstanding on c until stopping, then
// reads the late replies until the read deadline the caller sets.
//
// It sends and receives in batches (sendmmsg, recvmmsg), so that the load
// tool, which shares the cores with what it measures, costs as little per
// datagram as it can: its cost is a floor under every column alike, and a
// heavy client would hide the differences between them.
func runFlow(c *net.UDPConn, st *flowStats, window, size int, lossTimeout time.Duration, start time.Time,
	stopping, measuring *atomic.Bool, measured *atomic.Uint64) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	sb := mmsg.NewBatch(window, size, false)
	// One byte more than a reply should have, so that a longer one shows.
	rb := mmsg.NewBatch(window, size+1, false)
	var seq uint64    // next sequence number
	var cutoff uint64 // replies below it were written off as lost
	outstanding := 0  // sent at or after cutoff, not yet answered
	var toSend, sent int
	sendFn := func(fd uintptr) {
		sent = 0
		for sent < toSend {
			k, err := sb.Send(int(fd), sent, toSend, true)
			sent += k
			if err != nil {
				break // a full buffer or an ICMP error: the rest are lost
			}
		}
	}
	var n int
	var rerr error
	recvFn := func(fd uintptr) bool {
		n, rerr = rb.Recv(int(fd))
		return rerr != unix.EAGAIN
	}
	var deadline time.Time
	for !stopping.Load() {
		if want := window - outstanding; want > 0 {
			now := uint64(time.Since(start))
			for i := range want {
				binary.LittleEndian.PutUint64(sb.Bufs[i][0:], seq+uint64(i))
				binary.LittleEndian.PutUint64(sb.Bufs[i][8:], now)
			}
			toSend = want
			rc.Control(sendFn)
			// Datagrams the kernel refused count as sent and lost: the
			// loss timeout refills the window.
			seq += uint64(want)
			st.sent += uint64(want)
			outstanding += sent
		}
		now := time.Now()
		// Move the deadline only when half of it has passed: setting it
		// costs a timer update, which would otherwise be per datagram.
		if deadline.Sub(now) < lossTimeout/2 {
			deadline = now.Add(lossTimeout)
			c.SetReadDeadline(deadline)
		}
		err := rc.Read(recvFn)
		if err == nil {
			err = rerr
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// Nothing for a while: write off what is outstanding.
				cutoff, outstanding = seq, 0
				deadline = time.Time{}
				continue
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return
		}
		got := 0
		for i := range n {
			b := rb.Bufs[i][:rb.Lens[i]]
			if !st.record(b, size, start, seq) {
				continue
			}
			if binary.LittleEndian.Uint64(b[0:]) < cutoff {
				st.late++
				continue
			}
			outstanding--
			got++
		}
		if measuring.Load() && got > 0 {
			measured.Add(uint64(got))
		}
	}
	// Late replies, until the caller's deadline.
	for {
		err := rc.Read(recvFn)
		if err == nil {
			err = rerr
		}
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue
			}
			return
		}
		for i := range n {
			st.record(rb.Bufs[i][:rb.Lens[i]], size, start, seq)
		}
	}
}

// runFreshFlow sends one datagram at a time, each from a new socket, and
// waits up to lossTimeout for its reply, until stopping: a DNS resolver's
// pattern, which costs a proxy a flow (a socket) per query.
func runFreshFlow(to netip.AddrPort, st *flowStats, size int, lossTimeout time.Duration, start time.Time,
	stopping, measuring *atomic.Bool, measured *atomic.Uint64) {
	query := make([]byte, size)
	reply := make([]byte, size+1)
	for seq := uint64(0); !stopping.Load(); seq++ {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
		if err != nil {
			time.Sleep(time.Millisecond) // out of ports or descriptors: let some close
			continue
		}
		binary.LittleEndian.PutUint64(query[0:], seq)
		binary.LittleEndian.PutUint64(query[8:], uint64(time.Since(start)))
		st.sent++
		c.SetReadDeadline(time.Now().Add(lossTimeout))
		if _, err := c.Write(query); err == nil {
			if n, err := c.Read(reply); err == nil && st.record(reply[:n], size, start, seq+1) && measuring.Load() {
				measured.Add(1)
			}
		}
		c.Close()
	}
}

// record checks a reply and counts it; false if it is not one of ours.
func (st *flowStats) record(b []byte, size int, start time.Time, seq uint64) bool {
	if len(b) != size {
		st.bad++
		return false
	}
	s := binary.LittleEndian.Uint64(b[0:])
	sentAt := int64(binary.LittleEndian.Uint64(b[8:]))
	if s >= seq {
		st.bad++
		return false
	}
	st.received++
	st.h.add(int64(time.Since(start)) - sentAt)
	return true
}
