// Command reloadprobe is the load of scripts/bench-reload.sh: backends and
// clients that count what a proxy loses while it reloads, on loopback
// addresses only.
//
//	reloadprobe tcpecho -listen 127.0.0.1:23001,127.0.0.1:23002   # line echo, until SIGTERM
//	reloadprobe udpecho -listen 127.0.0.1:23011,127.0.0.1:23012   # datagram echo + the source it saw
//	reloadprobe churn   -target 127.0.0.1:23101 -workers 8        # new connection per line
//	reloadprobe streams -target 127.0.0.1:23101 -n 20 -every 50ms # long connections
//	reloadprobe udp     -target 127.0.0.1:23101 -flows 16 -every 20ms
//
// The clients run until SIGTERM or SIGINT (or -max, a bound for when nobody
// sends one), then finish what is under way and print one line of counts,
// key=value pairs, that the script parses. Before that, once warmed up
// (streams: every connection open and echoing; udp: every flow answered;
// churn: a first success), each prints "ready" to stderr.
//
//	churn ok=N refused=N reset=N timeout=N closed=N wrong=N other=N
//	streams n=N open_failed=N cut=N damaged=N lines_sent=N lines_echoed=N lines_lost=N
//	udp flows=N sent=N replied=N lost=N lossy_flows=N moved_flows=N source_changes=N icmp_refused=N
//
// churn: each of -workers loops over connect, send a line, read its echo,
// close, as fast as it can. A failure is counted once, by kind: refused
// (connect refused), reset (ECONNRESET or EPIPE), timeout (-timeout on any
// step), closed (EOF before the echo), wrong (an echo that is not the line
// sent), other (anything else; its first error goes to stderr).
//
// streams: -n connections opened first, each sending a line every -every:
// its stream number, a sequence number, random bytes and their CRC-32. The
// echo of each line is checked in order. At the end each stream stops
// sending, waits up to -timeout for the echoes still due, then closes. cut:
// streams whose connection failed (read or write error, EOF) before that;
// damaged: streams not cut whose echoes went wrong (a bad checksum, a line
// out of sequence) or fell short; lines_lost: lines sent and never echoed.
//
// udp: -flows connected sockets (a source port each), each sending a
// sequence-numbered datagram every -every. The echo backend (udpecho)
// returns the datagram with " from=IP:port", the source it saw: the
// proxy's socket toward it. At the end the clients stop sending and wait
// -grace for late replies. lost: datagrams without a reply; moved_flows:
// flows whose backend-side source changed at least once (source_changes
// counts every change); icmp_refused: reads that failed with ECONNREFUSED
// (an ICMP port unreachable: nothing was bound to the target port).
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/l4lb/l4lb/internal/loopback"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	args := os.Args[2:]
	var err error
	switch os.Args[1] {
	case "tcpecho":
		err = runTCPEcho(args)
	case "udpecho":
		err = runUDPEcho(args)
	case "churn":
		err = runChurn(args)
	case "streams":
		err = runStreams(args)
	case "udp":
		err = runUDP(args)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "reloadprobe:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: reloadprobe tcpecho|udpecho -listen ADDR[,ADDR...] | reloadprobe churn|streams|udp -target ADDR [flags]")
	os.Exit(2)
}

// loopbacks parses a comma-separated list of loopback IP:ports.
func loopbacks(s string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, f := range strings.Split(s, ",") {
		ap, err := loopback.ParseAddrPort(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		out = append(out, ap)
	}
	return out, nil
}

// stopContext is done at SIGTERM or SIGINT, or after max.
func stopContext(max time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	ctx, cancelMax := context.WithTimeout(ctx, max)
	return ctx, func() { cancelMax(); cancel() }
}

// ------------------------------------------------------------- backends ---

func runTCPEcho(args []string) error {
	fs := flag.NewFlagSet("tcpecho", flag.ExitOnError)
	listen := fs.String("listen", "", "comma-separated loopback IP:ports to serve")
	fs.Parse(args)
	addrs, err := loopbacks(*listen)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a.String())
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					// EMFILE and the like: wait instead of spinning.
					fmt.Fprintln(os.Stderr, "tcpecho: accept:", err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				go echoLines(c)
			}
		}()
	}
	ctx, cancel := stopContext(24 * time.Hour)
	defer cancel()
	<-ctx.Done()
	return nil
}

// echoLines writes back every line it reads, as it is.
func echoLines(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadSlice('\n')
		if len(line) > 0 {
			if _, werr := c.Write(line); werr != nil {
				return
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

func runUDPEcho(args []string) error {
	fs := flag.NewFlagSet("udpecho", flag.ExitOnError)
	listen := fs.String("listen", "", "comma-separated loopback IP:ports to serve")
	fs.Parse(args)
	addrs, err := loopbacks(*listen)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
		if err != nil {
			return err
		}
		go func() {
			buf := make([]byte, 65536)
			for {
				n, from, err := pc.ReadFromUDPAddrPort(buf)
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				reply := append(buf[:n:n], " from="+from.String()...)
				pc.WriteToUDPAddrPort(reply, from)
			}
		}()
	}
	ctx, cancel := stopContext(24 * time.Hour)
	defer cancel()
	<-ctx.Done()
	return nil
}

// ---------------------------------------------------------------- churn ---

type churnCounts struct {
	ok, refused, reset, timeout, closed, wrong, other atomic.Int64
	firstOther                                        sync.Once
}

func (c *churnCounts) fail(err error) {
	var ne net.Error
	switch {
	case errors.Is(err, errWrongEcho):
		c.wrong.Add(1)
	case errors.Is(err, syscall.ECONNREFUSED):
		c.refused.Add(1)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		c.reset.Add(1)
	case errors.As(err, &ne) && ne.Timeout():
		c.timeout.Add(1)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		c.closed.Add(1)
	default:
		c.other.Add(1)
		c.firstOther.Do(func() { fmt.Fprintln(os.Stderr, "churn: first other error:", err) })
	}
}

func runChurn(args []string) error {
	fs := flag.NewFlagSet("churn", flag.ExitOnError)
	target := fs.String("target", "", "loopback IP:port of the proxy")
	workers := fs.Int("workers", 8, "connections under way at once")
	timeout := fs.Duration("timeout", 3*time.Second, "bound on each connect and on each echo")
	maxRun := fs.Duration("max", 10*time.Minute, "stop after this long if no signal came")
	fs.Parse(args)
	ap, err := loopback.ParseAddrPort(*target)
	if err != nil {
		return err
	}
	ctx, cancel := stopContext(*maxRun)
	defer cancel()
	var c churnCounts
	var ready sync.Once
	var wg sync.WaitGroup
	for w := range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: *timeout}
			buf := make([]byte, 0, 128)
			rd := make([]byte, 128)
			for n := 0; ctx.Err() == nil; n++ {
				buf = fmt.Appendf(buf[:0], "churn %d %d %08x\n", w, n, rand.Uint32())
				if err := churnOnce(&d, ap.String(), buf, rd, *timeout); err != nil {
					c.fail(err)
					continue
				}
				c.ok.Add(1)
				ready.Do(func() { fmt.Fprintln(os.Stderr, "ready") })
			}
		}()
	}
	wg.Wait()
	fmt.Printf("churn ok=%d refused=%d reset=%d timeout=%d closed=%d wrong=%d other=%d\n",
		c.ok.Load(), c.refused.Load(), c.reset.Load(), c.timeout.Load(), c.closed.Load(), c.wrong.Load(), c.other.Load())
	return nil
}

var errWrongEcho = errors.New("wrong echo")

// churnOnce: connect, send line, read its echo, close. Not bound to the
// run's context: a connection under way at the stop is finished.
func churnOnce(d *net.Dialer, addr string, line, rd []byte, timeout time.Duration) (err error) {
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(line); err != nil {
		return err
	}
	got := 0
	for got < len(line) {
		n, err := conn.Read(rd[got:len(line)])
		got += n
		if err != nil {
			if errors.Is(err, io.EOF) && got > 0 {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
	if !bytes.Equal(rd[:got], line) {
		return fmt.Errorf("%w: sent %q, got %q", errWrongEcho, line, rd[:got])
	}
	return nil
}

// -------------------------------------------------------------- streams ---

type stream struct {
	id      int
	conn    net.Conn
	sent    atomic.Int64 // lines written
	echoed  atomic.Int64 // lines echoed back intact and in order
	cut     atomic.Bool  // the connection failed before the client closed it
	damaged atomic.Bool  // an echo was wrong
	done    atomic.Bool  // the sender has stopped: sent is final
	errOnce sync.Once
	readEnd chan struct{} // closed when the reader stops
}

func (s *stream) fail(err error, what string) {
	s.errOnce.Do(func() {
		fmt.Fprintf(os.Stderr, "streams: stream %d: %s: %v (sent %d, echoed %d)\n", s.id, what, err, s.sent.Load(), s.echoed.Load())
	})
}

// streamLine is "stream ID SEQ HEX CRC\n", CRC the CRC-32 of what precedes it.
func streamLine(buf []byte, id int, seq int64) []byte {
	buf = fmt.Appendf(buf[:0], "stream %d %d %016x%016x", id, seq, rand.Uint64(), rand.Uint64())
	return fmt.Appendf(buf, " %08x\n", crc32.ChecksumIEEE(buf))
}

// checkLine: line is intact and is stream id's line seq.
func checkLine(line []byte, id int, seq int64) bool {
	line = bytes.TrimSuffix(line, []byte("\n"))
	i := bytes.LastIndexByte(line, ' ')
	if i < 0 {
		return false
	}
	sum, err := strconv.ParseUint(string(line[i+1:]), 16, 32)
	if err != nil || uint32(sum) != crc32.ChecksumIEEE(line[:i]) {
		return false
	}
	f := strings.Fields(string(line[:i]))
	return len(f) == 4 && f[0] == "stream" && f[1] == strconv.Itoa(id) && f[2] == strconv.FormatInt(seq, 10)
}

func runStreams(args []string) error {
	fs := flag.NewFlagSet("streams", flag.ExitOnError)
	target := fs.String("target", "", "loopback IP:port of the proxy")
	n := fs.Int("n", 20, "long connections")
	every := fs.Duration("every", 50*time.Millisecond, "time between two lines of a stream")
	timeout := fs.Duration("timeout", 5*time.Second, "bound on opening a stream, and on the last echoes at the end")
	maxRun := fs.Duration("max", 10*time.Minute, "stop after this long if no signal came")
	fs.Parse(args)
	ap, err := loopback.ParseAddrPort(*target)
	if err != nil {
		return err
	}
	ctx, cancel := stopContext(*maxRun)
	defer cancel()

	// Open every stream first, each with one line echoed.
	streams := make([]*stream, 0, *n)
	openFailed := 0
	for id := range *n {
		s := &stream{id: id, readEnd: make(chan struct{})}
		conn, err := net.DialTimeout("tcp", ap.String(), *timeout)
		if err == nil {
			s.conn = conn
			err = s.first(*timeout)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "streams: stream %d did not open: %v\n", id, err)
			if s.conn != nil {
				s.conn.Close()
			}
			openFailed++
			continue
		}
		streams = append(streams, s)
	}
	fmt.Fprintln(os.Stderr, "ready")

	var wg sync.WaitGroup
	for _, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.run(ctx, *every, *timeout)
		}()
	}
	wg.Wait()

	var cut, damaged int
	var sent, echoed int64
	for _, s := range streams {
		sent += s.sent.Load()
		echoed += s.echoed.Load()
		if s.cut.Load() {
			cut++
		} else if s.damaged.Load() || s.echoed.Load() != s.sent.Load() {
			damaged++
		}
	}
	fmt.Printf("streams n=%d open_failed=%d cut=%d damaged=%d lines_sent=%d lines_echoed=%d lines_lost=%d\n",
		*n, openFailed, cut, damaged, sent, echoed, sent-echoed)
	return nil
}

// first sends line 0 and reads its echo, synchronously.
func (s *stream) first(timeout time.Duration) error {
	s.conn.SetDeadline(time.Now().Add(timeout))
	defer s.conn.SetDeadline(time.Time{})
	line := streamLine(nil, s.id, 0)
	if _, err := s.conn.Write(line); err != nil {
		return err
	}
	got, err := bufio.NewReader(s.conn).ReadSlice('\n')
	if err != nil {
		return err
	}
	if !checkLine(got, s.id, 0) {
		return fmt.Errorf("wrong echo %q", got)
	}
	s.sent.Store(1)
	s.echoed.Store(1)
	return nil
}

// run streams lines until ctx is done, then waits for the last echoes and
// closes.
func (s *stream) run(ctx context.Context, every, timeout time.Duration) {
	defer s.conn.Close()
	go s.read()
	tick := time.NewTicker(every)
	defer tick.Stop()
	var buf []byte
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-s.readEnd:
			return // cut or damaged: the reader said which
		case <-tick.C:
		}
		buf = streamLine(buf, s.id, s.sent.Load())
		s.conn.SetWriteDeadline(time.Now().Add(timeout))
		if _, err := s.conn.Write(buf); err != nil {
			s.cut.Store(true)
			s.fail(err, "write")
			return
		}
		s.sent.Add(1)
	}
	// The last echoes: wait until they are all in (or the reader ended),
	// at most timeout, then wake the reader with a deadline in the past.
	s.done.Store(true)
	end := time.Now().Add(timeout)
	for time.Now().Before(end) && s.echoed.Load() < s.sent.Load() {
		select {
		case <-s.readEnd:
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	s.conn.SetReadDeadline(time.Now())
	<-s.readEnd
}

// read checks each echoed line in order until an error, or until the
// sender has stopped and every line it sent is echoed.
func (s *stream) read() {
	defer close(s.readEnd)
	r := bufio.NewReader(s.conn)
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && s.done.Load() {
				// Only the end sets a read deadline.
				if s.echoed.Load() < s.sent.Load() {
					s.fail(fmt.Errorf("%d line(s) never echoed", s.sent.Load()-s.echoed.Load()), "last echoes")
				}
				return
			}
			s.cut.Store(true)
			s.fail(err, "read")
			return
		}
		seq := s.echoed.Load()
		if !checkLine(line, s.id, seq) {
			s.damaged.Store(true)
			s.fail(fmt.Errorf("line %d: got %q", seq, line), "echo")
			return
		}
		s.echoed.Add(1)
	}
}

// ------------------------------------------------------------------ udp ---

type flow struct {
	id       int
	conn     *net.UDPConn
	sent     atomic.Int64
	mu       sync.Mutex
	replied  map[int64]bool // sequence numbers answered
	source   string         // the backend-side source of the last reply
	changes  int            // times source changed
	refused  int            // reads failed with ECONNREFUSED
	readDone chan struct{}
}

func runUDP(args []string) error {
	fs := flag.NewFlagSet("udp", flag.ExitOnError)
	target := fs.String("target", "", "loopback IP:port of the proxy")
	flows := fs.Int("flows", 16, "client sockets (source ports)")
	every := fs.Duration("every", 20*time.Millisecond, "time between two datagrams of a flow")
	grace := fs.Duration("grace", time.Second, "wait for late replies after the last datagram")
	maxRun := fs.Duration("max", 10*time.Minute, "stop after this long if no signal came")
	fs.Parse(args)
	ap, err := loopback.ParseAddrPort(*target)
	if err != nil {
		return err
	}
	ctx, cancel := stopContext(*maxRun)
	defer cancel()

	fl := make([]*flow, *flows)
	for i := range fl {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(ap))
		if err != nil {
			return err
		}
		fl[i] = &flow{id: i, conn: c, replied: map[int64]bool{}, readDone: make(chan struct{})}
		go fl[i].read()
	}
	var wg sync.WaitGroup
	var answered sync.WaitGroup // every flow has a first reply: ready
	answered.Add(len(fl))
	for _, f := range fl {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Staggered over the period: flows that all send at the
			// same instant make bursts that overflow a receive queue
			// on the way, which would be counted as lost.
			f.send(ctx, *every, time.Duration(f.id)*(*every)/time.Duration(len(fl)), answered.Done)
		}()
	}
	go func() {
		answered.Wait()
		fmt.Fprintln(os.Stderr, "ready")
	}()
	wg.Wait()
	time.Sleep(*grace)
	var sent, replied, lossy, moved, changes, refused int64
	for _, f := range fl {
		f.conn.Close()
		<-f.readDone
		s := f.sent.Load()
		f.mu.Lock()
		r := int64(len(f.replied))
		sent += s
		replied += r
		if r < s {
			lossy++
		}
		if f.changes > 0 {
			moved++
		}
		changes += int64(f.changes)
		refused += int64(f.refused)
		f.mu.Unlock()
	}
	fmt.Printf("udp flows=%d sent=%d replied=%d lost=%d lossy_flows=%d moved_flows=%d source_changes=%d icmp_refused=%d\n",
		len(fl), sent, replied, sent-replied, lossy, moved, changes, refused)
	return nil
}

// send sends "flow ID SEQ" every period, from offset on, until ctx is
// done; answered is called once the flow has a first reply (at most
// once).
func (f *flow) send(ctx context.Context, every, offset time.Duration, answered func()) {
	select {
	case <-ctx.Done():
		answered()
		return
	case <-time.After(offset):
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var once sync.Once
	var buf []byte
	for {
		f.mu.Lock()
		got := len(f.replied) > 0
		f.mu.Unlock()
		if got {
			once.Do(answered)
		}
		select {
		case <-ctx.Done():
			once.Do(answered) // never blocks the ready line forever
			return
		case <-tick.C:
		}
		seq := f.sent.Load()
		buf = fmt.Appendf(buf[:0], "flow %d %d", f.id, seq)
		if _, err := f.conn.Write(buf); err != nil {
			// ECONNREFUSED from an earlier ICMP error surfaces on a write
			// too: the datagram is not sent, try the next one.
			if errors.Is(err, syscall.ECONNREFUSED) {
				f.mu.Lock()
				f.refused++
				f.mu.Unlock()
			}
			continue
		}
		f.sent.Add(1)
	}
}

// read records each reply: "flow ID SEQ from=IP:port".
func (f *flow) read() {
	defer close(f.readDone)
	buf := make([]byte, 2048)
	for {
		n, err := f.conn.Read(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				f.mu.Lock()
				f.refused++
				f.mu.Unlock()
			} else {
				time.Sleep(time.Millisecond) // no spinning on an unexpected error
			}
			continue
		}
		fields := strings.Fields(string(buf[:n]))
		if len(fields) != 4 || fields[0] != "flow" || fields[1] != strconv.Itoa(f.id) || !strings.HasPrefix(fields[3], "from=") {
			fmt.Fprintf(os.Stderr, "udp: flow %d: unexpected reply %q\n", f.id, buf[:n])
			continue
		}
		seq, err := strconv.ParseInt(fields[2], 10, 64)
		if err != nil {
			continue
		}
		src := strings.TrimPrefix(fields[3], "from=")
		f.mu.Lock()
		f.replied[seq] = true
		if f.source != "" && src != f.source {
			f.changes++
		}
		f.source = src
		f.mu.Unlock()
	}
}
