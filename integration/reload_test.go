package integration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The tests of live reconfiguration (issue 3): SIGHUP and file-watch
// reloads of the real binary while traffic flows through it.

// reloadTimeout bounds the wait for the log line of one reload: the
// reloader waits 100 ms for more triggers, then parses and applies.
const reloadTimeout = 5 * time.Second

// rconf is a whole l4lb config for the reload tests. Unlike configTOML it
// can set weights, workers, drain_timeout and [reload] watch.
type rconf struct {
	Watch    bool
	Services []rsvc
}

// rsvc is one TCP service on the IPv4 VIP.
type rsvc struct {
	Name     string
	Port     uint16
	Workers  int    // 2 when 0
	Drain    string // "5s" when ""
	Idle     string // "1m" when ""
	Backends []rbackend
}

type rbackend struct {
	Addr   netip.AddrPort
	Weight int
}

// weighted gives each address weight 100.
func weighted(addrs ...netip.AddrPort) []rbackend {
	out := make([]rbackend, len(addrs))
	for i, a := range addrs {
		out[i] = rbackend{Addr: a, Weight: 100}
	}
	return out
}

func (c rconf) String() string {
	var b strings.Builder
	b.WriteString("[admin]\nlisten = \"\"\n")
	if c.Watch {
		b.WriteString("\n[reload]\nwatch = true\n")
	}
	for _, s := range c.Services {
		workers, drain, idle := s.Workers, s.Drain, s.Idle
		if workers == 0 {
			workers = 2
		}
		if drain == "" {
			drain = "5s"
		}
		if idle == "" {
			idle = "1m"
		}
		fmt.Fprintf(&b, "\n[services.%s]\nlisten = %q\nworkers = %d\nconnect_timeout = \"2s\"\nidle_timeout = %q\ndrain_timeout = %q\n",
			s.Name, netip.AddrPortFrom(vip4, s.Port), workers, idle, drain)
		for _, be := range s.Backends {
			fmt.Fprintf(&b, "\n  [[services.%s.backends]]\n  address = %q\n  weight = %d\n", s.Name, be.Addr, be.Weight)
		}
	}
	return b.String()
}

// backendAddrs starts an echo backend (counted in counts, when not nil) on
// port in every backend namespace and returns their addresses, in order.
func backendAddrs(t *testing.T, top *topology, port uint16, counts *accepts) []netip.AddrPort {
	t.Helper()
	h := handler(echo)
	if counts != nil {
		h = counts.wrap(echo)
	}
	var out []netip.AddrPort
	for _, b := range top.Backends {
		addr := netip.AddrPortFrom(b.Addr4, port)
		startBackend(t, b.NS, b.Name, addr, h)
		out = append(out, addr)
	}
	return out
}

// accepts counts the connections each backend accepted: what "no new
// connection reaches it" is checked against.
type accepts struct {
	mu sync.Mutex // guards n
	n  map[string]int
}

func (a *accepts) wrap(h handler) handler {
	return func(name string, c *net.TCPConn) error {
		a.mu.Lock()
		if a.n == nil {
			a.n = make(map[string]int)
		}
		a.n[name]++
		a.mu.Unlock()
		return h(name, c)
	}
}

func (a *accepts) get(name string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.n[name]
}

// replaceFile gives path the content data the way editors and config
// management do: write a temporary file in the same directory, then rename
// it over path. l4lb never sees a half-written file.
func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// entries returns the log entries of l's stderr whose first line contains
// substr, each with the lines that continue it: hclog prints a multi-line
// value, such as the list of problems of a config, as indented "  | " lines
// under its entry.
func (l *lb) entries(substr string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return collectEntries(l.out, substr)
}

func collectEntries(lines []string, substr string) []string {
	var out []string
	for i := 0; i < len(lines); i++ {
		text, ok := strings.CutPrefix(lines[i], "stderr: ")
		if !ok || !strings.Contains(text, substr) {
			continue
		}
		entry := text
		for i+1 < len(lines) && strings.HasPrefix(lines[i+1], "stderr:  ") {
			i++
			entry += "\n" + strings.TrimPrefix(lines[i], "stderr: ")
		}
		out = append(out, entry)
	}
	return out
}

// waitEntries waits up to timeout until at least n entries contain substr
// and returns them all.
func (l *lb) waitEntries(substr string, n int, timeout time.Duration) ([]string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		l.mu.Lock()
		got, newLine := collectEntries(l.out, substr), l.newLine
		l.mu.Unlock()
		if len(got) >= n && entryComplete(got[len(got)-1]) {
			return got, nil
		}
		if l.Exited() {
			return got, fmt.Errorf("l4lb exited (%v) with %d entries containing %q, want %d", l.state, len(got), substr, n)
		}
		select {
		case <-newLine:
		case <-l.exited:
		case <-timer.C:
			return got, fmt.Errorf("%d entries containing %q after %v, want %d", len(got), substr, timeout, n)
		}
	}
}

// entryComplete reports whether every line of a log entry is in. Only a
// rejection is awaited before its continuation: its error is printed on
// the same line when it is one line, and otherwise as "  error=", "  | "
// lines and a blank "  " line.
func entryComplete(e string) bool {
	if !strings.Contains(e, "reload rejected") {
		return true
	}
	header, _, _ := strings.Cut(e, "\n")
	return strings.Contains(header, " error=") || strings.HasSuffix(e, "\n  ")
}

var reloadedRE = regexp.MustCompile(`l4lb: reloaded: trigger=("[^"]*"|\S+) version=(\d+) new_version=(\d+) hash=\S+ changes=`)

// reloads returns the (version, new_version) of every "reloaded" line.
func (l *lb) reloads(t *testing.T) [][2]int {
	t.Helper()
	var out [][2]int
	for _, e := range l.entries("l4lb: reloaded: ") {
		m := reloadedRE.FindStringSubmatch(e)
		if m == nil {
			t.Fatalf("reloaded line %q does not match %v", e, reloadedRE)
		}
		from, _ := strconv.Atoi(m[2])
		to, _ := strconv.Atoi(m[3])
		out = append(out, [2]int{from, to})
	}
	return out
}

// reloadTo writes conf over l's config file, sends SIGHUP and waits for the
// "reloaded" line with new_version=version. It returns the time it saw the
// line, which follows the swap by the time a log line takes to arrive.
func reloadTo(t *testing.T, l *lb, conf string, version int) time.Time {
	t.Helper()
	replaceFile(t, l.Path, []byte(conf))
	l.Signal(t, syscall.SIGHUP)
	want := fmt.Sprintf("version=%d new_version=%d ", version-1, version)
	if _, err := l.waitEntries(want, 1, reloadTimeout); err != nil {
		t.Fatalf("reload to version %d: %v", version, err)
	}
	return time.Now()
}

// sysctlIn sets a sysctl (a path under /proc/sys) inside namespace ns.
func sysctlIn(t *testing.T, ns, key, value string) {
	t.Helper()
	err := inNetns(ns, func() error {
		return os.WriteFile("/proc/sys/"+strings.ReplaceAll(key, ".", "/"), []byte(value), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v", key, value, ns, err)
	}
}

// widenPorts gives the client and lb namespaces 55k ephemeral ports instead
// of 28k: the short-connection loops leave every port they used in
// TIME_WAIT for a minute (the client and l4lb's backend side close first).
// The test services listen below 10000, out of the way.
func widenPorts(t *testing.T, top *topology) {
	t.Helper()
	sysctlIn(t, top.LB, "net.ipv4.ip_local_port_range", "10000 65535")
	for _, c := range top.Clients {
		sysctlIn(t, c.NS, "net.ipv4.ip_local_port_range", "10000 65535")
	}
}

// failure kinds of a short connection.
const (
	failConnect  = iota // the dial failed
	failReset           // ECONNRESET anywhere
	failMismatch        // the echo differs from the payload
	failOther           // EOF before the greeting, timeouts, ...
	numFailKinds
)

var failNames = [numFailKinds]string{"failed connects", "resets", "payload mismatches", "other failures"}

// payloads are pseudo-random request bodies with their SHA-256; each short
// connection sends one. 4 KiB fits in the socket buffers, so the client can
// write it all before it reads.
type payload struct {
	data []byte
	sum  [32]byte
}

func makePayloads(n, size int) []payload {
	out := make([]payload, n)
	for i := range out {
		var key [32]byte
		binary.LittleEndian.PutUint64(key[:], uint64(i)+1000)
		out[i].data = make([]byte, size)
		rand.NewChaCha8(key).Read(out[i].data)
		out[i].sum = sha256.Sum256(out[i].data)
	}
	return out
}

// shortEcho makes one short connection: dial, send p, half-close, and
// check that the reply is a greeting then p again (by length and SHA-256)
// and a clean EOF.
func shortEcho(ns string, src netip.Addr, dst netip.AddrPort, p payload) (string, int, error) {
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		return "", failConnect, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	kind := func(err error) int {
		if errors.Is(err, syscall.ECONNRESET) {
			return failReset
		}
		return failOther
	}
	if _, err := c.Write(p.data); err != nil {
		return "", kind(err), fmt.Errorf("write: %w", err)
	}
	if err := c.CloseWrite(); err != nil {
		return "", kind(err), fmt.Errorf("CloseWrite: %w", err)
	}
	br := bufio.NewReader(c)
	name, err := readGreeting(br)
	if err != nil {
		return "", kind(err), err
	}
	got, err := io.ReadAll(br)
	if err != nil {
		return name, kind(err), fmt.Errorf("read echo from %s after %d bytes: %w", name, len(got), err)
	}
	if len(got) != len(p.data) || sha256.Sum256(got) != p.sum {
		return name, failMismatch, fmt.Errorf("echo from %s: %d bytes sha256 %x, sent %d bytes sha256 %x",
			name, len(got), sha256.Sum256(got), len(p.data), p.sum)
	}
	return name, -1, nil
}

// traffic is a client loop of short echo connections.
type traffic struct {
	stopc    chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
	start    time.Time
	elapsed  time.Duration // set by stop

	ok     atomic.Int64
	failed [numFailKinds]atomic.Int64

	mu        sync.Mutex // guards firstErrs and perBackend
	firstErrs []string
	// perBackend counts the connections each backend answered.
	perBackend map[string]int
}

// maxTrafficTime bounds a traffic loop that a test forgot to stop.
const maxTrafficTime = 2 * time.Minute

// startTraffic runs workers goroutines that open short echo connections to
// dst, back to back, each from its own source address of c, until stop.
func startTraffic(t *testing.T, c *clientNS, dst netip.AddrPort, workers int) *traffic {
	t.Helper()
	if workers > len(c.Addrs4) {
		t.Fatalf("%d traffic workers, but the client has only %d addresses", workers, len(c.Addrs4))
	}
	payloads := makePayloads(64, 4<<10)
	tr := &traffic{stopc: make(chan struct{}), start: time.Now(), perBackend: map[string]int{}}
	for w := range workers {
		src := c.Addrs4[w]
		tr.wg.Go(func() {
			deadline := time.Now().Add(maxTrafficTime)
			for i := w; time.Now().Before(deadline); i++ {
				select {
				case <-tr.stopc:
					return
				default:
				}
				name, kind, err := shortEcho(c.NS, src, dst, payloads[i%len(payloads)])
				if err == nil {
					tr.ok.Add(1)
					tr.mu.Lock()
					tr.perBackend[name]++
					tr.mu.Unlock()
					continue
				}
				tr.failed[kind].Add(1)
				tr.mu.Lock()
				if len(tr.firstErrs) < 10 {
					tr.firstErrs = append(tr.firstErrs, fmt.Sprintf("%s at +%v: %v",
						failNames[kind], time.Since(tr.start).Round(time.Millisecond), err))
				}
				tr.mu.Unlock()
			}
		})
	}
	t.Cleanup(tr.stop)
	return tr
}

func (tr *traffic) stop() {
	tr.stopOnce.Do(func() {
		close(tr.stopc)
		tr.wg.Wait()
		tr.elapsed = time.Since(tr.start)
	})
}

// check stops the loop, logs its rate and fails the test on any failed
// connection; it returns the number of good connections.
func (tr *traffic) check(t *testing.T, what string) int64 {
	t.Helper()
	tr.stop()
	ok := tr.ok.Load()
	var failed []string
	var total int64
	for k := range numFailKinds {
		n := tr.failed[k].Load()
		total += n
		failed = append(failed, fmt.Sprintf("%d %s", n, failNames[k]))
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	t.Logf("%s: %d connections in %v (%.0f/s), per backend %v; %s", what, ok, tr.elapsed.Round(time.Millisecond),
		float64(ok)/tr.elapsed.Seconds(), tr.perBackend, strings.Join(failed, ", "))
	if total > 0 {
		t.Errorf("%s: %d of %d connections failed (%s); first ones:\n%s", what, total, total+ok,
			strings.Join(failed, ", "), strings.Join(tr.firstErrs, "\n"))
	}
	if ok == 0 {
		t.Errorf("%s: no connection succeeded", what)
	}
	return ok
}

// listenCounters reads TcpExtListenDrops and TcpExtListenOverflows in
// namespace ns.
func listenCounters(t *testing.T, ns string) map[string]int64 {
	t.Helper()
	// -a: absolute values, -s: leave nstat's history file alone, -z: print
	// zero counters too.
	out, err := exec.Command("ip", "netns", "exec", ns, "nstat", "-asz", "TcpExtListenDrops", "TcpExtListenOverflows").Output()
	if err != nil {
		t.Fatalf("nstat in %s: %v", ns, err)
	}
	got := map[string]int64{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("nstat line %q: %v", line, err)
		}
		got[f[0]] = n
	}
	if len(got) != 2 {
		t.Fatalf("nstat output lacks the two counters:\n%s", out)
	}
	return got
}

// TestReloadStorm reloads every 100 ms for 30 s, alternating between two
// configs that change the backends of the service under load and add or
// remove a second service, while a client opens short connections as fast
// as it can: not one may fail, and no accept queue may drop a connection.
func TestReloadStorm(t *testing.T) {
	const (
		stormFor = 30 * time.Second
		every    = 100 * time.Millisecond
		workers  = 4
	)
	top := newTopology(t, 1, workers, 3)
	widenPorts(t, top)
	b := backendAddrs(t, top, echoPort, nil)
	confA := rconf{Services: []rsvc{
		{Name: "echo", Port: echoPort, Backends: weighted(b[0], b[1])},
		{Name: "side", Port: echoPort + 1, Backends: weighted(b[2])},
	}}.String()
	confB := rconf{Services: []rsvc{
		{Name: "echo", Port: echoPort, Backends: weighted(b[1], b[2])},
	}}.String()
	l := startLB(t, top.LB, confA)

	before := listenCounters(t, top.LB)
	tr := startTraffic(t, top.Clients[0], netip.AddrPortFrom(vip4, echoPort), workers)
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	signals := 0
	for end := time.Now().Add(stormFor); time.Now().Before(end); {
		<-ticker.C
		conf := confB
		if signals%2 == 1 {
			conf = confA
		}
		replaceFile(t, l.Path, []byte(conf))
		l.Signal(t, syscall.SIGHUP)
		signals++
	}
	// Let the last reload land before the traffic stops.
	time.Sleep(300 * time.Millisecond)
	ok := tr.check(t, "during the storm")
	after := listenCounters(t, top.LB)

	for k, v := range after {
		if v > before[k] {
			t.Errorf("%s rose from %d to %d during the storm", k, before[k], v)
		}
	}
	if rejected := l.entries("reload rejected"); len(rejected) > 0 {
		t.Errorf("%d reloads rejected, first: %s", len(rejected), rejected[0])
	}
	// Versions go up by one per applied reload, without gaps.
	reloads := l.reloads(t)
	for i, r := range reloads {
		if r != [2]int{i + 1, i + 2} {
			t.Errorf("reload %d went from version %d to %d, want %d to %d", i, r[0], r[1], i+1, i+2)
			break
		}
	}
	// Bursts merge, and a reload may read the same content as the one
	// before (a no-op), so there are fewer reloads than signals; but a storm
	// of 100 ms signals for this long cannot apply fewer than 10.
	if len(reloads) < 10 {
		t.Errorf("%d reloads applied for %d SIGHUPs, want at least 10", len(reloads), signals)
	}
	started, removed := len(l.entries("service started: service=side")), len(l.entries("service removed"))
	t.Logf("%d SIGHUPs, %d reloads applied (service side started %d times, removed %d times); %d connections; listen counters before %v after %v",
		signals, len(reloads), started, removed, ok, before, after)
	if removed == 0 || started < 2 {
		t.Errorf("service side started %d and removed %d times: the storm did not add and remove it", started, removed)
	}
}

// stream is a long echo connection that sends pseudo-random data until
// told to stop, then half-closes; it checks the echo by length and SHA-256.
type stream struct {
	name  string // the backend
	stopc chan struct{}
	done  chan struct{}
	sent  int64
	err   error // set before done is closed
}

// startStream dials dst from src and streams 8 KiB every 5 ms (1.6 MB/s).
func startStream(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort, seed uint64) *stream {
	t.Helper()
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioTimeout))
	br := bufio.NewReader(c)
	name, err := readGreeting(br)
	if err != nil {
		c.Close()
		t.Fatalf("from %s: %v", src, err)
	}
	s := &stream{name: name, stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer c.Close()
		sent := sha256.New()
		werr := make(chan error, 1)
		go func() {
			var key [32]byte
			binary.LittleEndian.PutUint64(key[:], seed)
			src := rand.NewChaCha8(key)
			buf := make([]byte, 8<<10)
			tick := time.NewTicker(5 * time.Millisecond)
			defer tick.Stop()
			for deadline := time.Now().Add(ioTimeout / 2); time.Now().Before(deadline); {
				select {
				case <-s.stopc:
					werr <- c.CloseWrite()
					return
				case <-tick.C:
				}
				src.Read(buf)
				sent.Write(buf)
				n, err := c.Write(buf)
				s.sent += int64(n)
				if err != nil {
					werr <- fmt.Errorf("write after %d bytes: %w", s.sent, err)
					return
				}
			}
			werr <- errors.New("not stopped in time")
		}()
		got := sha256.New()
		m, rerr := io.Copy(got, br)
		if err := <-werr; err != nil {
			s.err = err
			return
		}
		switch {
		case rerr != nil:
			s.err = fmt.Errorf("read echo after %d bytes: %w", m, rerr)
		case m != s.sent || !bytes.Equal(got.Sum(nil), sent.Sum(nil)):
			s.err = fmt.Errorf("echo: %d bytes sha256 %x, sent %d bytes sha256 %x", m, got.Sum(nil), s.sent, sent.Sum(nil))
		}
	}()
	return s
}

// TestReloadLongFlows keeps 50 connections streaming through 50 reloads
// that add and remove a third backend and a second service, but never touch
// the backends the connections are on: every connection must carry every
// byte, in order, to its end.
func TestReloadLongFlows(t *testing.T) {
	const flows, reloads, perAddr = 50, 50, 5
	top := newTopology(t, 1, flows/perAddr, 3)
	b := backendAddrs(t, top, echoPort, nil)
	confA := rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Backends: weighted(b[0], b[1])}}}.String()
	confB := rconf{Services: []rsvc{
		{Name: "echo", Port: echoPort, Idle: "2m", Backends: weighted(b[0], b[1], b[2])},
		{Name: "side", Port: echoPort + 1, Backends: weighted(b[2])},
	}}.String()
	l := startLB(t, top.LB, confA)

	c := top.Clients[0]
	var streams []*stream
	perBackend := map[string]int{}
	for i := range flows {
		s := startStream(t, c.NS, c.Addrs4[i/perAddr], netip.AddrPortFrom(vip4, echoPort), uint64(i))
		streams = append(streams, s)
		perBackend[s.name]++
	}
	// Stop them all on the way out, whatever happens.
	defer func() {
		for _, s := range streams {
			select {
			case <-s.stopc:
			default:
				close(s.stopc)
			}
			<-s.done
		}
	}()

	start := time.Now()
	for i := range reloads {
		conf := confB
		if i%2 == 1 {
			conf = confA
		}
		reloadTo(t, l, conf, i+2)
		for _, s := range streams {
			select {
			case <-s.done:
				t.Fatalf("a flow to %s ended after %d reloads: %v", s.name, i+1, s.err)
			default:
			}
		}
	}
	elapsed := time.Since(start)
	var total int64
	for _, s := range streams {
		close(s.stopc)
		<-s.done
		total += s.sent
		if s.err != nil {
			t.Errorf("flow to %s: %v", s.name, s.err)
		}
	}
	t.Logf("%d flows (per backend %v) carried %d MiB each way, intact, through %d reloads in %v",
		flows, perBackend, total>>20, reloads, elapsed.Round(time.Millisecond))
}

// pinger keeps an echo connection busy with a line every 50 ms and records
// when it stops working.
type pinger struct {
	name     string // the backend
	src      netip.Addr
	stopc    chan struct{}
	done     chan struct{}
	failedAt time.Time // zero when stopped while still working; set before done closes
	err      error
}

const pingEvery = 50 * time.Millisecond

// startPinger dials dst from src, reads the greeting and pings until stop
// or the first error, for at most 30 s.
func startPinger(t *testing.T, ns string, src netip.Addr, dst netip.AddrPort) *pinger {
	t.Helper()
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioTimeout))
	br := bufio.NewReader(c)
	name, err := readGreeting(br)
	if err != nil {
		c.Close()
		t.Fatalf("from %s: %v", src, err)
	}
	p := &pinger{name: name, src: src, stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		defer c.Close()
		tick := time.NewTicker(pingEvery)
		defer tick.Stop()
		for i := range int(30 * time.Second / pingEvery) {
			select {
			case <-p.stopc:
				return
			case <-tick.C:
			}
			msg := fmt.Sprintf("ping %d\n", i)
			if _, err := io.WriteString(c, msg); err != nil {
				p.failedAt, p.err = time.Now(), fmt.Errorf("write: %w", err)
				return
			}
			got, err := br.ReadString('\n')
			if err != nil || got != msg {
				p.failedAt, p.err = time.Now(), fmt.Errorf("read %q, %v; want %q", got, err, msg)
				return
			}
		}
		p.err = errors.New("still pinging after 30 s")
	}()
	t.Cleanup(p.stop)
	return p
}

func (p *pinger) stop() {
	select {
	case <-p.stopc:
	default:
		close(p.stopc)
	}
	<-p.done
}

// pingers opens one pinger from every IPv4 address of c and sorts them by
// backend.
func pingers(t *testing.T, c *clientNS, dst netip.AddrPort) map[string][]*pinger {
	t.Helper()
	out := map[string][]*pinger{}
	for _, src := range c.Addrs4 {
		p := startPinger(t, c.NS, src, dst)
		out[p.name] = append(out[p.name], p)
	}
	return out
}

// TestReloadDrain removes backend b1 (or sets its weight to 0) with
// drain_timeout = "3s": from the reload on, b1 accepts no new connection;
// its open connections keep flowing and are closed 3 s ± 0.5 s after the
// reload; the connections of b2 never notice.
func TestReloadDrain(t *testing.T) {
	const drain = 3 * time.Second
	for _, tc := range []struct {
		name  string
		after func(b []netip.AddrPort) []rbackend
	}{
		{"removed", func(b []netip.AddrPort) []rbackend { return weighted(b[1]) }},
		{"weight 0", func(b []netip.AddrPort) []rbackend {
			return []rbackend{{Addr: b[0], Weight: 0}, {Addr: b[1], Weight: 100}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := newTopology(t, 1, 12, 2)
			var counts accepts
			b := backendAddrs(t, top, echoPort, &counts)
			l := startLB(t, top.LB, rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Drain: drain.String(), Backends: weighted(b...)}}}.String())
			c := top.Clients[0]
			dst := netip.AddrPortFrom(vip4, echoPort)
			open := pingers(t, c, dst)
			if len(open["b1"]) == 0 || len(open["b2"]) == 0 {
				t.Fatalf("connections per backend: b1 %d, b2 %d; want some on each", len(open["b1"]), len(open["b2"]))
			}

			reloadedAt := reloadTo(t, l, rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Drain: drain.String(), Backends: tc.after(b)}}}.String(), 2)
			b1Accepted := counts.get("b1")
			// New connections from every source, those that b1 had
			// included: all must reach b2.
			for _, src := range c.Addrs4 {
				name, _, err := greeting(c.NS, src, dst)
				if err != nil {
					t.Errorf("new connection from %s after the reload: %v", src, err)
				} else if name != "b2" {
					t.Errorf("new connection from %s after the reload reached %s", src, name)
				}
			}

			// Past the drain deadline and its tolerance.
			time.Sleep(time.Until(reloadedAt.Add(drain + time.Second)))
			if n := counts.get("b1"); n != b1Accepted {
				t.Errorf("b1 accepted %d connections after the reload", n-b1Accepted)
			}
			for _, p := range open["b1"] {
				p.stop()
				if p.failedAt.IsZero() {
					t.Errorf("connection from %s to b1 still open %v after the reload (drain_timeout %v)", p.src, time.Since(reloadedAt).Round(time.Millisecond), drain)
					continue
				}
				at := p.failedAt.Sub(reloadedAt)
				t.Logf("connection from %s to b1 closed %v after the reload: %v", p.src, at.Round(time.Millisecond), p.err)
				if at < drain-500*time.Millisecond || at > drain+500*time.Millisecond {
					t.Errorf("connection from %s to b1 closed %v after the reload, want %v ± 0.5s", p.src, at.Round(time.Millisecond), drain)
				}
			}
			for _, p := range open["b2"] {
				p.stop()
				if !p.failedAt.IsZero() {
					t.Errorf("connection from %s to b2 broke %v after the reload: %v", p.src, p.failedAt.Sub(reloadedAt).Round(time.Millisecond), p.err)
				}
			}
			want := fmt.Sprintf("closed_connections=%d", len(open["b1"]))
			if e := l.entries("drain finished"); len(e) != 1 || !strings.Contains(e[0], "backend=10.78.1.2:7000") || !strings.Contains(e[0], want) {
				t.Errorf("drain finished lines %q, want one for b1 with %s", e, want)
			}
		})
	}
}

// TestReloadReaddedWhileDraining removes b1 and puts it back one second
// later, before its drain_timeout of 3 s: its connections must live on past
// the deadline the removal had set, and new connections reach it again.
func TestReloadReaddedWhileDraining(t *testing.T) {
	const drain = 3 * time.Second
	top := newTopology(t, 1, 12, 2)
	b := backendAddrs(t, top, echoPort, nil)
	both := rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Drain: drain.String(), Backends: weighted(b...)}}}.String()
	l := startLB(t, top.LB, both)
	c := top.Clients[0]
	dst := netip.AddrPortFrom(vip4, echoPort)
	open := pingers(t, c, dst)
	if len(open["b1"]) == 0 {
		t.Fatalf("no connection reached b1: %v", open)
	}

	removedAt := reloadTo(t, l, rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Drain: drain.String(), Backends: weighted(b[1])}}}.String(), 2)
	if _, err := l.waitEntries("draining backend", 1, time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(removedAt.Add(time.Second)))
	reloadTo(t, l, both, 3)
	if _, err := l.waitEntries("drain cancelled", 1, time.Second); err != nil {
		t.Error(err)
	}
	// Past the deadline the removal had set.
	time.Sleep(time.Until(removedAt.Add(drain + time.Second)))
	for _, ps := range open {
		for _, p := range ps {
			p.stop()
			if !p.failedAt.IsZero() {
				t.Errorf("connection from %s to %s broke %v after b1 was removed: %v", p.src, p.name, p.failedAt.Sub(removedAt).Round(time.Millisecond), p.err)
			}
		}
	}
	for _, p := range open["b1"] {
		if name, _, err := greeting(c.NS, p.src, dst); err != nil || name != "b1" {
			t.Errorf("new connection from %s after b1 came back: reached %q, %v; want b1 as before", p.src, name, err)
		}
	}
	if e := l.entries("drain finished"); len(e) > 0 {
		t.Errorf("drain finished after the backend came back: %q", e)
	}
	t.Logf("%d connections to b1 and %d to b2 kept through removal and return", len(open["b1"]), len(open["b2"]))
}

// TestReloadListeners adds a service by reload, which must accept at once,
// then removes it: new connections are refused at once, the open one keeps
// working until drain_timeout (2 s) and is closed then. The service that
// stays serves a client loop throughout without a failure.
func TestReloadListeners(t *testing.T) {
	const drain = 2 * time.Second
	top := newTopology(t, 1, 4, 2)
	b := backendAddrs(t, top, echoPort, nil)
	echoSvc := rsvc{Name: "echo", Port: echoPort, Backends: weighted(b...)}
	side := rsvc{Name: "side", Port: echoPort + 1, Drain: drain.String(), Backends: weighted(b...)}
	sideAddr := netip.AddrPortFrom(vip4, side.Port)
	l := startLB(t, top.LB, rconf{Services: []rsvc{echoSvc}}.String())
	c := top.Clients[0]
	tr := startTraffic(t, c, netip.AddrPortFrom(vip4, echoPort), 2)

	if conn, err := dialFrom(c.NS, c.Addrs4[2], sideAddr); err == nil {
		conn.Close()
		t.Fatalf("%s accepts before the service is configured", sideAddr)
	}
	reloadTo(t, l, rconf{Services: []rsvc{echoSvc, side}}.String(), 2)
	// No retry: the socket is bound before the reload is logged.
	if _, _, err := shortEcho(c.NS, c.Addrs4[2], sideAddr, makePayloads(1, 1000)[0]); err != nil {
		t.Fatalf("first connection to the added service: %v", err)
	}
	p := startPinger(t, c.NS, c.Addrs4[3], sideAddr)

	removedAt := reloadTo(t, l, rconf{Services: []rsvc{echoSvc}}.String(), 3)
	_, err := dialFrom(c.NS, c.Addrs4[2], sideAddr)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("new connection to the removed service: %v, want connection refused", err)
	}
	// Past drain_timeout and its tolerance; a connection that broke early
	// fails the window check below.
	time.Sleep(time.Until(removedAt.Add(drain + time.Second)))
	p.stop()
	if p.failedAt.IsZero() {
		t.Errorf("open connection to the removed service still works %v after removal (drain_timeout %v)", time.Since(removedAt).Round(time.Millisecond), drain)
	} else {
		at := p.failedAt.Sub(removedAt)
		t.Logf("open connection to the removed service closed %v after the reload: %v", at.Round(time.Millisecond), p.err)
		if at < drain-500*time.Millisecond || at > drain+500*time.Millisecond {
			t.Errorf("open connection to the removed service closed %v after removal, want %v ± 0.5s", at.Round(time.Millisecond), drain)
		}
	}
	if _, err := l.waitEntries("service stopped: service=side", 1, time.Second); err != nil {
		t.Error(err)
	}
	tr.check(t, "service echo while side came and went")
}

// TestReloadWorkers raises workers from 1 to 3 and back, 15 times, while a
// client loop connects: no connection may fail. tcp_migrate_req is on in
// the lb namespace, so lowering really closes sockets (without it l4lb
// keeps them, which is trivially safe); the kernel must hand their queued
// connections to the sockets that stay. A socket's accept queue is seldom
// non-empty at the moment it closes, hence the many cycles: with migration
// off, 15 closes under this load reset connections in practice.
func TestReloadWorkers(t *testing.T) {
	const cycles = 15
	top := newTopology(t, 1, 8, 2)
	sysctlIn(t, top.LB, "net.ipv4.tcp_migrate_req", "1")
	b := backendAddrs(t, top, echoPort, nil)
	conf := func(workers int) string {
		return rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Workers: workers, Backends: weighted(b...)}}}.String()
	}
	l := startLB(t, top.LB, conf(1))
	tr := startTraffic(t, top.Clients[0], netip.AddrPortFrom(vip4, echoPort), 8)
	version := 1
	for range cycles {
		for _, w := range []int{3, 1} {
			time.Sleep(150 * time.Millisecond) // traffic on the current sockets
			version++
			reloadTo(t, l, conf(w), version)
		}
	}
	time.Sleep(300 * time.Millisecond)
	tr.check(t, "while workers changed")
	added, removed := l.entries("workers added"), l.entries("workers removed")
	if len(added) != cycles || len(removed) != cycles {
		t.Errorf("%d \"workers added\" and %d \"workers removed\" lines, want %d of each", len(added), len(removed), cycles)
	}
}

// TestReloadFileWatch runs with [reload] watch = true: replacing the file
// by rename, or by swapping a Kubernetes-style ..data symlink, reloads
// exactly once; writing the same bytes again, in place or by rename,
// reloads nothing.
func TestReloadFileWatch(t *testing.T) {
	top := newTopology(t, 0, 0, 2)
	b := backendAddrs(t, top, echoPort, nil)
	conf := func(drain string) []byte {
		return []byte(rconf{Watch: true, Services: []rsvc{{Name: "echo", Port: echoPort, Drain: drain, Backends: weighted(b...)}}}.String())
	}
	first := conf("5s")
	l := startLB(t, top.LB, string(first), "-log-level", "debug")
	dir := filepath.Dir(l.Path)

	// settled waits long enough for any reload the watcher could still
	// start (10 times the 100 ms merge window) and returns the reloads.
	settled := func() [][2]int {
		time.Sleep(time.Second)
		return l.reloads(t)
	}
	// expectNoop runs change, which must make the watcher look at the file
	// (a line says it found no change) and reload nothing.
	expectNoop := func(what string, wantReloads int, change func()) {
		t.Helper()
		seen := len(l.entries("reload: config unchanged"))
		change()
		if _, err := l.waitEntries("reload: config unchanged", seen+1, reloadTimeout); err != nil {
			t.Errorf("%s: the watcher did not look at the file: %v", what, err)
		}
		if got := settled(); len(got) != wantReloads {
			t.Errorf("%s: %d reloads in all, want %d: %v", what, len(got), wantReloads, got)
		}
	}
	expectOne := func(what string, version int) {
		t.Helper()
		want := fmt.Sprintf(`trigger="file change" version=%d new_version=%d `, version-1, version)
		if _, err := l.waitEntries(want, 1, reloadTimeout); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if got := settled(); len(got) != version-1 {
			t.Errorf("%s: %d reloads in all, want %d: %v", what, len(got), version-1, got)
		}
	}

	second := conf("6s")
	replaceFile(t, l.Path, second)
	expectOne("rename of a changed file", 2)

	expectNoop("same bytes written in place", 1, func() {
		if err := os.WriteFile(l.Path, second, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	expectNoop("rename of identical content", 1, func() { replaceFile(t, l.Path, second) })

	// Kubernetes mounts a ConfigMap as FILE -> ..data/FILE, ..data ->
	// ..TIMESTAMP, and updates it by renaming a new ..data symlink over the
	// old one.
	symlinkSwap := func(version string, data []byte) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(dir, version), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, version, "l4lb.toml"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(version, filepath.Join(dir, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	expectNoop("the file replaced by a symlink to the same content", 1, func() {
		symlinkSwap("..v1", second)
		if err := os.Symlink("..data/l4lb.toml", l.Path+".tmp"); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(l.Path+".tmp", l.Path); err != nil {
			t.Fatal(err)
		}
	})
	symlinkSwap("..v2", conf("7s"))
	expectOne("..data symlink swapped to a changed file", 3)
	expectNoop("..data symlink swapped to the same content", 2, func() { symlinkSwap("..v3", conf("7s")) })

	if e := l.entries("reload rejected"); len(e) > 0 {
		t.Errorf("rejected reloads: %q", e)
	}
}

// badConfigs is the expected rejection of every file of
// testdata/reload_bad: each want must appear in the rejection logged by
// l4lb and, unless runOnly, in the stderr of `l4lb check`, with FILE
// replaced by the path of the file read.
var badConfigs = []struct {
	file string
	want []string
	// runOnly: the file is valid, but cannot be applied in the test's lb
	// namespace, which `l4lb check` cannot know.
	runOnly bool
}{
	{file: "admin_listen.toml", want: []string{"FILE: admin.listen: ", "localhost"}},
	{file: "backend_hostname.toml", want: []string{"FILE: services.echo.backends[0].address: ", "b1.internal"}},
	{file: "backend_ipv6_brackets.toml", want: []string{"FILE: services.echo.backends[0].address: ", "brackets"}},
	{file: "backend_no_address.toml", want: []string{"FILE: services.echo.backends[1].address: missing"}},
	{file: "backend_port_range.toml", want: []string{"FILE: services.echo.backends[1].address: ", "65536"}},
	{file: "backends_empty.toml", want: []string{"FILE: services.echo.backends: no backends"}},
	{file: "backends_missing.toml", want: []string{"FILE: services.echo.backends: no backends"}},
	{file: "balance_unknown.toml", want: []string{"FILE: services.echo.balance: ", "random"}},
	{file: "duplicate_backend.toml", want: []string{"FILE: services.echo.backends[2].address: duplicate"}},
	{file: "duplicate_backend_ipv6.toml", want: []string{"FILE: services.echo.backends[1].address: duplicate"}},
	{file: "duration_integer.toml", want: []string{"FILE: services.echo.idle_timeout: ", "duration"}},
	{file: "duration_negative.toml", want: []string{"FILE: services.echo.connect_timeout: ", "-1s"}},
	{file: "duration_no_unit.toml", want: []string{"FILE: services.echo.drain_timeout: ", "is not a duration"}},
	{file: "duration_words.toml", want: []string{"FILE: services.echo.connect_timeout: ", "3 seconds"}},
	{file: "duration_zero.toml", want: []string{"FILE: services.echo.connect_timeout: ", "0s"}},
	{file: "empty.toml", want: []string{"FILE: services: no services"}},
	{file: "hash_key_round_robin.toml", want: []string{"FILE: services.echo.hash_key: "}},
	{file: "listen_in_use.toml", runOnly: true, want: []string{"services.blocked.listen: ", "address already in use"}},
	{file: "listen_ipv6_zone.toml", want: []string{"FILE: services.echo.listen: ", "zone"}},
	{file: "listen_missing.toml", want: []string{"FILE: services.echo.listen: missing"}},
	{file: "listen_no_ip.toml", want: []string{"FILE: services.echo.listen: ", "missing IP"}},
	{file: "listen_port_name.toml", want: []string{"FILE: services.echo.listen: ", "is not a number"}},
	{file: "listen_port_range.toml", want: []string{"FILE: services.echo.listen: ", "70000"}},
	{file: "listen_port_zero.toml", want: []string{"FILE: services.echo.listen: ", "port 0"}},
	{file: "listen_shared.toml", want: []string{"FILE: services.other.listen: ", "services.echo.listen"}},
	{file: "listen_wildcard_overlap.toml", want: []string{"FILE: services.other.listen: ", "services.echo.listen"}},
	{file: "protocol_unknown.toml", want: []string{"FILE: services.echo.protocol: ", "sctp"}},
	{file: "service_name.toml", want: []string{"FILE: services.echo service: "}},
	{file: "services_string.toml", want: []string{"FILE: services: "}},
	{file: "syntax_bare_word.toml", want: []string{"FILE:7:12: "}},
	{file: "syntax_duplicate_key.toml", want: []string{"FILE:7:1: ", "services.echo.listen"}},
	{file: "syntax_duplicate_table.toml", want: []string{"FILE:11:2: ", "services.echo"}},
	{file: "syntax_missing_value.toml", want: []string{"FILE:6:9: "}},
	{file: "syntax_table_vs_array.toml", want: []string{"FILE:11:5: ", "services.echo.backends"}},
	{file: "syntax_unclosed_string.toml", want: []string{"FILE:6:25: "}},
	{file: "syntax_unclosed_table.toml", want: []string{"FILE:5:15: "}},
	{file: "truncated_header.toml", want: []string{"FILE:11:22: "}},
	{file: "truncated_no_services.toml", want: []string{"FILE: services: no services"}},
	{file: "truncated_string.toml", want: []string{"FILE:12:20: "}},
	{file: "unknown_backend_key.toml", want: []string{"FILE: services.echo.backends[1].adress: unknown key"}},
	{file: "unknown_service_key.toml", want: []string{"FILE: services.echo.drain_timout: unknown key"}},
	{file: "unknown_table.toml", want: []string{"FILE: relaod: unknown key"}},
	{file: "watch_string.toml", want: []string{"FILE: reload.watch: "}},
	{file: "weight_float.toml", want: []string{"FILE: services.echo.backends[0].weight: ", "float"}},
	{file: "weight_negative.toml", want: []string{"FILE: services.echo.backends[0].weight: ", "-5"}},
	{file: "weight_range.toml", want: []string{"FILE: services.echo.backends[0].weight: ", "1001"}},
	{file: "weight_string.toml", want: []string{"FILE: services.echo.backends[0].weight: ", "string"}},
	{file: "workers_range.toml", want: []string{"FILE: services.echo.workers: ", "5000"}},
	{file: "workers_string.toml", want: []string{"FILE: services.echo.workers: ", "string"}},
}

// TestReloadBadConfigs writes every file of testdata/reload_bad over the
// running config and sends SIGHUP: each must be rejected, logged at error
// level with the line or key at fault, and counted, while the version stays
// 1 and a client loop never fails; a good file afterwards becomes version 2.
// `l4lb check` must reject each file too, except listen_in_use.toml: its
// address is taken by another socket in the lb namespace, which only a bind
// there can tell.
func TestReloadBadConfigs(t *testing.T) {
	const dir = "testdata/reload_bad"
	files, err := filepath.Glob(filepath.Join(dir, "*.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 30 {
		t.Errorf("%d files in %s, want at least 30", len(files), dir)
	}
	inTable := map[string]bool{}
	for _, tc := range badConfigs {
		inTable[tc.file] = true
		if !slices.Contains(files, filepath.Join(dir, tc.file)) {
			t.Errorf("%s is in the table but not in %s", tc.file, dir)
		}
	}
	for _, f := range files {
		if !inTable[filepath.Base(f)] {
			t.Errorf("%s has no row in badConfigs", f)
		}
	}

	top := newTopology(t, 1, 4, 2)
	b := backendAddrs(t, top, echoPort, nil)
	// The addresses the corpus is written for.
	if b[0].String() != "10.78.1.2:7000" || b[1].String() != "10.78.2.2:7000" || vip4.String() != "10.77.0.1" {
		t.Fatalf("topology addresses %v, %v changed: update %s", vip4, b, dir)
	}
	good := rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Backends: weighted(b...)}}}
	l := startLB(t, top.LB, good.String())
	// Another process's socket on the address listen_in_use.toml adds,
	// bound without SO_REUSEPORT.
	blocker, err := listenIn(top.LB, netip.MustParseAddrPort("10.77.0.1:7100"))
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	tr := startTraffic(t, top.Clients[0], netip.AddrPortFrom(vip4, echoPort), 2)

	for i, tc := range badConfigs {
		path := filepath.Join(dir, tc.file)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		replaceFile(t, l.Path, data)
		l.Signal(t, syscall.SIGHUP)
		got, err := l.waitEntries("reload rejected, still serving the running config", i+1, reloadTimeout)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		entry := got[i]
		if !strings.Contains(entry, "[ERROR]") || !strings.Contains(entry, " version=1 ") || !strings.Contains(entry, fmt.Sprintf("failed_total=%d", i+1)) {
			t.Errorf("%s: rejection %q: want [ERROR], version=1 and failed_total=%d", tc.file, entry, i+1)
		}
		for _, w := range tc.want {
			if w = strings.ReplaceAll(w, "FILE", l.Path); !strings.Contains(entry, w) {
				t.Errorf("%s: rejection lacks %q:\n%s", tc.file, w, entry)
			}
		}

		code, _, stderr := runL4lb(t, "check", "-config", path)
		switch {
		case tc.runOnly && code != 0:
			t.Errorf("l4lb check %s: exit %d, want 0 (the file is valid):\n%s", path, code, stderr)
		case !tc.runOnly && code != 1:
			t.Errorf("l4lb check %s: exit %d, want 1", path, code)
		case !tc.runOnly:
			for _, w := range tc.want {
				if w = strings.ReplaceAll(w, "FILE", path); !strings.Contains(stderr, w) {
					t.Errorf("l4lb check %s: stderr lacks %q:\n%s", path, w, stderr)
				}
			}
		}
	}
	if r := l.reloads(t); len(r) > 0 {
		t.Errorf("bad files were applied: %v", r)
	}

	good.Services[0].Drain = "6s"
	reloadTo(t, l, good.String(), 2)
	tr.check(t, fmt.Sprintf("through %d rejected reloads", len(badConfigs)))
}
