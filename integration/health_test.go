package integration

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Health checks end to end: backends killed, blackholed and flapping with
// nftables, a real redis-server checked with PING/+PONG and paused with
// SIGSTOP, every backend down, and on_down = "close". Probe intervals are
// short (300 ms) so that each test takes seconds; the flapping test keeps
// the 1 s interval.

// healthSlack is added to every window a health transition must happen
// in: process scheduling, log pipes and the nft commands themselves.
const healthSlack = 500 * time.Millisecond

// checkedService is a service with health settings, rendered whole by
// toml.
type checkedService struct {
	Name     string
	Listen   netip.AddrPort
	Backends []netip.AddrPort
	// Health is the body of [services.NAME.health]; "" leaves the table
	// out (no checks).
	Health string
	// Extra holds more keys of [services.NAME] (passive_fall, on_down...).
	Extra string
}

func (s checkedService) toml() string {
	var b strings.Builder
	fmt.Fprintf(&b, `
[services.%s]
listen = %q
balance = "maglev"
hash_key = "source_ip"
workers = 2
connect_timeout = "1s"
idle_timeout = "1m"
drain_timeout = "2s"
%s
`, s.Name, s.Listen, s.Extra)
	if s.Health != "" {
		fmt.Fprintf(&b, "[services.%s.health]\n%s\n", s.Name, s.Health)
	}
	for _, a := range s.Backends {
		fmt.Fprintf(&b, "[[services.%s.backends]]\naddress = %q\n", s.Name, a)
	}
	return b.String()
}

func healthConf(svcs ...checkedService) string {
	conf := "[admin]\nlisten = \"\"\n"
	for _, s := range svcs {
		conf += s.toml()
	}
	return conf
}

// tcpCheck is a [health] body for TCP connect checks.
func tcpCheck(interval, timeout time.Duration, rise, fall int) string {
	return fmt.Sprintf("kind = \"tcp\"\ninterval = %q\ntimeout = %q\nrise = %d\nfall = %d\n", interval, timeout, rise, fall)
}

// logMark is a position in a process's output, to wait for lines printed
// after it.
func logMark(p *process) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.out)
}

// waitLog waits up to timeout for a stderr line after mark that contains
// every one of substrs. It returns when the line arrived and its index.
func waitLog(p *process, mark int, timeout time.Duration, substrs ...string) (time.Time, int, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for seen := mark; ; {
		p.mu.Lock()
		lines, newLine := p.out[seen:], p.newLine
		first := seen
		seen = len(p.out)
		p.mu.Unlock()
		for i, line := range lines {
			if matchAll(line, "stderr: ", substrs) {
				return time.Now(), first + i, nil
			}
		}
		select {
		case <-newLine:
		case <-p.exited:
			return time.Time{}, 0, fmt.Errorf("l4lb exited without printing %q", substrs)
		case <-timer.C:
			return time.Time{}, 0, fmt.Errorf("no line with %q within %v", substrs, timeout)
		}
	}
}

// countLog counts the stderr lines in [from, to) that contain every one of
// substrs; to < 0 means up to now.
func countLog(p *process, from, to int, substrs ...string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if to < 0 {
		to = len(p.out)
	}
	n := 0
	for _, line := range p.out[from:to] {
		if matchAll(line, "stderr: ", substrs) {
			n++
		}
	}
	return n
}

func matchAll(line, prefix string, substrs []string) bool {
	if !strings.HasPrefix(line, prefix) {
		return false
	}
	for _, s := range substrs {
		if !strings.Contains(line, s) {
			return false
		}
	}
	return true
}

// transitionTo are the words of l4lb's log line for a health change of
// backend addr to state.
func transitionTo(addr netip.AddrPort, state string) []string {
	return []string{"backend health changed", "backend=" + addr.String(), "to=" + state}
}

// nftIn runs an nft script inside namespace ns.
func nftIn(t *testing.T, ns, script string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s:\n%s\n: %v: %s", ns, script, err, out)
	}
}

// Rules in a backend namespace's own table: "drop" blackholes new and
// open connections to a port (connects time out), "reject" answers
// connects with a reset (connection refused).
func nftBlock(t *testing.T, ns string, port uint16, verdict string) {
	t.Helper()
	if verdict == "reject" {
		verdict = "reject with tcp reset"
	}
	nftInputRule(t, ns, fmt.Sprintf("tcp dport %d %s", port, verdict))
}

// nftInputRule installs rule in the input chain of a namespace's own table,
// which nftUnblock deletes.
func nftInputRule(t *testing.T, ns, rule string) {
	t.Helper()
	nftIn(t, ns, fmt.Sprintf(`table inet l4t {
	chain input {
		type filter hook input priority 0; policy accept;
		%s
	}
}
`, rule))
}

func nftUnblock(t *testing.T, ns string) {
	t.Helper()
	nftIn(t, ns, "delete table inet l4t\n")
}

// startRedis runs a redis-server on addr in namespace ns, without
// persistence, and waits until it accepts connections. Cleanup kills it if
// it still runs.
func startRedis(t *testing.T, ns string, addr netip.AddrPort) *process {
	t.Helper()
	p, err := startProcess(t, ns, "stdout", "Ready to accept connections",
		"redis-server", "--bind", addr.Addr().String(), "--port", strconv.Itoa(int(addr.Port())),
		"--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", t.TempDir())
	if p == nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() {
		if !p.Exited() {
			p.cmd.Process.Signal(syscall.SIGCONT) // in case a test left it stopped
			p.cmd.Process.Kill()
		}
		<-p.exited
	})
	if err != nil {
		t.Fatalf("start redis-server: %v\n%s", err, p.Output())
	}
	return p
}

// redisPing sends PING on c and expects +PONG.
func redisPing(c *net.TCPConn) (string, error) {
	c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.WriteString(c, "PING\r\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read PING reply: %w (got %q)", err, line)
	}
	if line != "+PONG\r\n" {
		return "", fmt.Errorf("PING reply %q, want +PONG", line)
	}
	return "redis", nil
}

// greet reads a Go echo backend's greeting on c.
func greet(c *net.TCPConn) (string, error) {
	c.SetDeadline(time.Now().Add(ioTimeout))
	return readGreeting(bufio.NewReader(c))
}

// clientLoop is a client opening short connections from every source
// address of a client namespace, one after another per address, each doing
// one exchange.
type clientLoop struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex // guards the fields below
	ok       int
	failures []loopFailure
	reached  map[string]int
}

type loopFailure struct {
	start time.Time // when the exchange began
	what  string    // "time: from source: error"
}

func startClientLoop(t *testing.T, c *clientNS, dst netip.AddrPort, exchange func(*net.TCPConn) (string, error)) *clientLoop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &clientLoop{cancel: cancel, reached: map[string]int{}}
	for _, src := range c.Addrs4 {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				start := time.Now()
				name, err := func() (string, error) {
					conn, err := dialFrom(c.NS, src, dst)
					if err != nil {
						return "", err
					}
					defer conn.Close()
					return exchange(conn)
				}()
				l.mu.Lock()
				if err != nil {
					l.failures = append(l.failures, loopFailure{start, fmt.Sprintf("%s: from %s: %v", time.Now().Format("15:04:05.000"), src, err)})
				} else {
					l.ok++
					l.reached[name]++
				}
				l.mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	t.Cleanup(l.stop)
	return l
}

func (l *clientLoop) stop() {
	l.cancel()
	l.wg.Wait()
}

// check stops the loop and fails the test if any exchange failed, except
// those already under way when a killed backend was gone (killedAt; zero
// when none was killed): their connection may have reached the backend
// that died, which no retry can save.
func (l *clientLoop) check(t *testing.T, killedAt time.Time) {
	t.Helper()
	l.stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	var failed []string
	excused := 0
	for _, f := range l.failures {
		if !killedAt.IsZero() && f.start.Before(killedAt) {
			excused++
			t.Logf("client failure of a connection open when the backend was killed: %s", f.what)
			continue
		}
		failed = append(failed, f.what)
	}
	t.Logf("client loop: %d exchanges ok, %d failed (%d of them open at the kill), per backend %v", l.ok, len(l.failures), excused, l.reached)
	if l.ok == 0 {
		t.Error("client loop: no exchange succeeded")
	}
	for i, f := range failed {
		if i == 10 {
			t.Errorf("... and %d more failures", len(failed)-10)
			break
		}
		t.Errorf("client failure: %s", f)
	}
}

// waitAllUp waits until l4lb has reported every backend up and routes to
// all of them.
func waitAllUp(t *testing.T, l *lb, backends []netip.AddrPort) {
	t.Helper()
	for _, a := range backends {
		if _, _, err := waitLog(l.process, 0, 5*time.Second, transitionTo(a, "up")...); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := waitLog(l.process, 0, 5*time.Second, "routing table rebuilt", fmt.Sprintf("healthy=%d ", len(backends))); err != nil {
		t.Fatal(err)
	}
}

// TestHealthKilledBackend kills one of three redis-server backends (its
// port then refuses connects) while a client loop runs: the checks mark it
// down within fall × interval + timeout, retries hide it from clients
// meanwhile, and a new redis-server on the same port is up within
// rise × interval.
func TestHealthKilledBackend(t *testing.T) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 3
	top := newTopology(t, 1, 6, 3)
	svc := checkedService{Name: "redis", Listen: netip.AddrPortFrom(vip4, 6379), Extra: "passive_fall = 0",
		Health: tcpCheck(interval, timeout, rise, fall)}
	redis := map[netip.AddrPort]*process{}
	for _, b := range top.Backends {
		addr := netip.AddrPortFrom(b.Addr4, 6379)
		redis[addr] = startRedis(t, b.NS, addr)
		svc.Backends = append(svc.Backends, addr)
	}
	l := startLB(t, top.LB, healthConf(svc))
	waitAllUp(t, l, svc.Backends)
	loop := startClientLoop(t, top.Clients[0], svc.Listen, redisPing)
	time.Sleep(300 * time.Millisecond) // some traffic on every backend first

	victim := svc.Backends[0]
	mark := logMark(l.process)
	killed := time.Now()
	redis[victim].cmd.Process.Kill()
	<-redis[victim].exited
	// Connections that reached redis before it was gone die with it; only
	// those that started later must be saved by retries.
	dead := time.Now()
	downWithin := fall*interval + timeout + healthSlack
	at, _, err := waitLog(l.process, mark, downWithin, transitionTo(victim, "down")...)
	if err != nil {
		t.Fatalf("killed backend: %v", err)
	}
	t.Logf("killed backend marked down %v after the kill (bound %v + slack)", at.Sub(killed).Round(time.Millisecond), fall*interval+timeout)
	time.Sleep(300 * time.Millisecond) // traffic with the backend out of the route

	mark = logMark(l.process)
	restarted := time.Now()
	startRedis(t, top.Backends[0].NS, victim)
	upWithin := rise*interval + healthSlack
	at, _, err = waitLog(l.process, mark, upWithin, transitionTo(victim, "up")...)
	if err != nil {
		t.Fatalf("restarted backend: %v", err)
	}
	t.Logf("restarted backend marked up %v after it listened again (bound %v + slack)", at.Sub(restarted).Round(time.Millisecond), rise*interval)
	loop.check(t, dead)
}

// TestHealthBlackholedBackend drops every packet to one backend's port
// with nftables, so connects time out: the checks mark it down within
// fall × interval + timeout while clients see no failure.
func TestHealthBlackholedBackend(t *testing.T) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 3
	top := newTopology(t, 1, 6, 3)
	echoSvc := echoService(t, top, "echo", echoPort, false, echo)
	svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends, Extra: "passive_fall = 0",
		Health: tcpCheck(interval, timeout, rise, fall)}
	l := startLB(t, top.LB, healthConf(svc))
	waitAllUp(t, l, svc.Backends)
	loop := startClientLoop(t, top.Clients[0], svc.Listen, greet)
	time.Sleep(300 * time.Millisecond)

	victim, ns := svc.Backends[0], top.Backends[0].NS
	mark := logMark(l.process)
	dropped := time.Now()
	nftBlock(t, ns, echoPort, "drop")
	at, i, err := waitLog(l.process, mark, fall*interval+timeout+healthSlack, transitionTo(victim, "down")...)
	if err != nil {
		t.Fatalf("blackholed backend: %v", err)
	}
	t.Logf("blackholed backend marked down %v after the drop rule (bound %v + slack)", at.Sub(dropped).Round(time.Millisecond), fall*interval+timeout)
	if line := l.Output(); !strings.Contains(strings.Split(line, "\n")[i], "timed out") {
		t.Errorf("down transition does not say the probe timed out: %s", strings.Split(line, "\n")[i])
	}
	time.Sleep(300 * time.Millisecond)

	mark = logMark(l.process)
	restored := time.Now()
	nftUnblock(t, ns)
	at, _, err = waitLog(l.process, mark, rise*interval+healthSlack, transitionTo(victim, "up")...)
	if err != nil {
		t.Fatalf("backend after the drop rule went: %v", err)
	}
	t.Logf("backend marked up %v after the drop rule went (bound %v + slack)", at.Sub(restored).Round(time.Millisecond), rise*interval)
	loop.check(t, time.Time{})
}

// maxTransitions is how many state changes rise/fall allow in probes
// results, starting up: fall failures for each down, rise successes for
// each up.
func maxTransitions(probes, rise, fall int) int {
	n, need := 0, fall
	for probes >= need {
		probes -= need
		n++
		if need == fall {
			need = rise
		} else {
			need = fall
		}
	}
	return n
}

// TestHealthFlapping toggles an nftables reject on one backend every
// second for 8 s, with the settings (interval 1s, rise 2, fall 3):
// the backend changes state, and the table is rebuilt, no more often than
// rise and fall allow for the probes made meanwhile.
func TestHealthFlapping(t *testing.T) {
	const interval, timeout, rise, fall = time.Second, 500 * time.Millisecond, 2, 3
	const toggles = 8
	top := newTopology(t, 1, 1, 3)
	echoSvc := echoService(t, top, "echo", echoPort, false, echo)
	svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends, Extra: "passive_fall = 0",
		Health: tcpCheck(interval, timeout, rise, fall)}
	l := startLB(t, top.LB, healthConf(svc))
	waitAllUp(t, l, svc.Backends)
	time.Sleep(2 * interval) // past the first probes' rebuild

	victim, ns := svc.Backends[0], top.Backends[0].NS
	from := logMark(l.process)
	start := time.Now()
	for i := range toggles {
		if i%2 == 0 {
			nftBlock(t, ns, echoPort, "reject")
		} else {
			nftUnblock(t, ns)
		}
		time.Sleep(time.Until(start.Add(time.Duration(i+1) * time.Second)))
	}
	if toggles%2 == 1 {
		nftUnblock(t, ns)
	}
	time.Sleep(200 * time.Millisecond) // the last rebuild, if one is pending
	to := logMark(l.process)
	elapsed := time.Since(start)

	transitions := countLog(l.process, from, to, "backend health changed", "backend="+victim.String())
	others := countLog(l.process, from, to, "backend health changed") - transitions
	rebuilds := countLog(l.process, from, to, "routing table rebuilt")
	// Probes of the victim in the window: one per interval, plus one for
	// a probe that started just before the window.
	probes := int(elapsed/interval) + 1
	allowed := maxTransitions(probes, rise, fall)
	t.Logf("%d toggles in %v: %d transitions of the flapping backend, %d rebuilds; rise/fall allow %d transitions in %d probes",
		toggles, elapsed.Round(time.Millisecond), transitions, rebuilds, allowed, probes)
	if transitions > allowed {
		t.Errorf("%d transitions of the flapping backend, rise %d fall %d allow at most %d in %d probes", transitions, rise, fall, allowed, probes)
	}
	if others != 0 {
		t.Errorf("%d transitions of the steady backends", others)
	}
	if rebuilds > transitions {
		t.Errorf("%d rebuilds for %d transitions", rebuilds, transitions)
	}
}

// TestHealthSendExpectRedis checks two real redis-servers with PING/+PONG:
// both up; one paused with SIGSTOP (connects still succeed, PING gets no
// answer) is down once fall probes timed out, and up again after SIGCONT.
// A second service expecting the wrong reply never takes its backends up.
func TestHealthSendExpectRedis(t *testing.T) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 2
	top := newTopology(t, 1, 2, 2)
	check := func(expect string) string {
		return fmt.Sprintf("kind = \"send_expect\"\ninterval = %q\ntimeout = %q\nrise = %d\nfall = %d\nsend = \"PING\\r\\n\"\nexpect = %q\n",
			interval, timeout, rise, fall, expect)
	}
	svc := checkedService{Name: "redis", Listen: netip.AddrPortFrom(vip4, 6379), Extra: "passive_fall = 0", Health: check("+PONG")}
	wrong := checkedService{Name: "wrong", Listen: netip.AddrPortFrom(vip4, 6380), Health: check("+PANG")}
	redis := map[netip.AddrPort]*process{}
	for _, b := range top.Backends {
		addr := netip.AddrPortFrom(b.Addr4, 6379)
		redis[addr] = startRedis(t, b.NS, addr)
		svc.Backends = append(svc.Backends, addr)
		wrong.Backends = append(wrong.Backends, addr)
	}
	l := startLB(t, top.LB, healthConf(svc, wrong))
	waitAllUp(t, l, svc.Backends)
	for _, a := range wrong.Backends {
		if _, _, err := waitLog(l.process, 0, fall*interval+timeout+healthSlack, append(transitionTo(a, "down"), "service=wrong", `does not start with \"+PANG\"`)...); err != nil {
			t.Errorf("service expecting +PANG: %v", err)
		}
	}
	if n := countLog(l.process, 0, -1, append(transitionTo(wrong.Backends[0], "up"), "service=wrong")...); n != 0 {
		t.Errorf("service expecting +PANG took a backend up")
	}
	c := top.Clients[0]
	ping := func(what string) {
		conn, err := dialFrom(c.NS, c.Addrs4[0], svc.Listen)
		if err == nil {
			defer conn.Close()
			_, err = redisPing(conn)
		}
		if err != nil {
			t.Errorf("PING through l4lb %s: %v", what, err)
		}
	}
	ping("with both up")

	victim := svc.Backends[0]
	mark := logMark(l.process)
	stopped := time.Now()
	redis[victim].Signal(t, syscall.SIGSTOP)
	at, i, err := waitLog(l.process, mark, fall*interval+timeout+healthSlack, transitionTo(victim, "down")...)
	if err != nil {
		redis[victim].Signal(t, syscall.SIGCONT)
		t.Fatalf("redis under SIGSTOP: %v", err)
	}
	t.Logf("redis under SIGSTOP marked down %v after the signal (bound %v + slack)", at.Sub(stopped).Round(time.Millisecond), fall*interval+timeout)
	if line := strings.Split(l.Output(), "\n")[i]; !strings.Contains(line, "read reply: timed out") {
		t.Errorf("down transition does not say the reply timed out: %s", line)
	}
	time.Sleep(2 * interval)
	// Both client addresses hash somewhere; with the stopped redis out of
	// the route every PING lands on the other one.
	ping("with one redis stopped")

	mark = logMark(l.process)
	resumed := time.Now()
	redis[victim].Signal(t, syscall.SIGCONT)
	at, _, err = waitLog(l.process, mark, rise*interval+healthSlack, transitionTo(victim, "up")...)
	if err != nil {
		t.Fatalf("redis after SIGCONT: %v", err)
	}
	t.Logf("redis after SIGCONT marked up %v later (bound %v + slack)", at.Sub(resumed).Round(time.Millisecond), rise*interval)
}

// cpuTime is the user plus system CPU time process pid has used.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The fields after the command name, which is in parentheses and may
	// hold spaces: state is field 3, utime 14 and stime 15.
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	const ticks = 100 // USER_HZ on every Linux architecture Go supports
	return time.Duration(utime+stime) * time.Second / ticks
}

// TestHealthAllDown rejects connects to every backend: new client
// connections are then closed at once, counted, with one log line per
// second at most and little CPU; the first backend to come back takes
// traffic within one interval, rise notwithstanding. With panic_mode =
// "all" the clients go to the backends anyway.
func TestHealthAllDown(t *testing.T) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 3, 2

	t.Run("refuse", func(t *testing.T) {
		top := newTopology(t, 1, 2, 2)
		echoSvc := echoService(t, top, "echo", echoPort, false, echo)
		svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends,
			Health: tcpCheck(interval, timeout, rise, fall)}
		l := startLB(t, top.LB, healthConf(svc))
		waitAllUp(t, l, svc.Backends)

		mark := logMark(l.process)
		for _, b := range top.Backends {
			nftBlock(t, b.NS, echoPort, "reject")
		}
		for _, a := range svc.Backends {
			if _, _, err := waitLog(l.process, mark, fall*interval+timeout+healthSlack, transitionTo(a, "down")...); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := waitLog(l.process, mark, time.Second, "routing table rebuilt", "healthy=0"); err != nil {
			t.Fatal(err)
		}

		c := top.Clients[0]
		mark = logMark(l.process)
		cpuBefore, start := cpuTime(t, l.cmd.Process.Pid), time.Now()
		const conns = 40
		var slowest time.Duration
		for i := range conns {
			conn, err := dialFrom(c.NS, c.Addrs4[i%2], svc.Listen)
			if err != nil {
				t.Fatalf("connect with all backends down: %v (l4lb should accept, then close)", err)
			}
			accepted := time.Now()
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := conn.Read(make([]byte, 1))
			closedAfter := time.Since(accepted)
			conn.Close()
			if n != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("connection %d with all backends down: read %d bytes, %v; want it closed", i, n, err)
			}
			slowest = max(slowest, closedAfter)
			time.Sleep(50 * time.Millisecond)
		}
		elapsed := time.Since(start)
		cpu := cpuTime(t, l.cmd.Process.Pid) - cpuBefore
		t.Logf("%d connections with all backends down: each closed within %v; l4lb used %v CPU in %v", conns, slowest.Round(time.Microsecond), cpu, elapsed.Round(time.Millisecond))
		if slowest > 100*time.Millisecond {
			t.Errorf("a connection stayed open %v with all backends down, want under 100ms", slowest)
		}
		// A busy loop would use a whole core; 40 refusals and a few probes
		// use a few milliseconds.
		if cpu > elapsed/4 {
			t.Errorf("l4lb used %v CPU in %v with all backends down", cpu, elapsed)
		}
		lines := countLog(l.process, mark, -1, "closing client: no backend available", "no healthy backend")
		if limit := int(elapsed/time.Second) + 1; lines == 0 || lines > limit {
			t.Errorf("%d refusal log lines in %v, want 1 to %d (one per second at most)", lines, elapsed, limit)
		}

		// Recovery: rise is 3, yet with nothing serving the first backend
		// to answer takes traffic at its first successful probe.
		restored := time.Now()
		nftUnblock(t, top.Backends[1].NS)
		var served time.Duration
		for served == 0 && time.Since(restored) < 5*time.Second {
			if name, _, err := greeting(c.NS, c.Addrs4[0], svc.Listen); err == nil {
				served = time.Since(restored)
				if name != top.Backends[1].Name {
					t.Errorf("served by %s, want %s, the only one unblocked", name, top.Backends[1].Name)
				}
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if served == 0 {
			t.Fatal("no client served within 5s of a backend coming back")
		}
		t.Logf("first client served %v after a backend came back (interval %v, rise %d)", served.Round(time.Millisecond), interval, rise)
		if bound := interval + 100*time.Millisecond + healthSlack; served > bound {
			t.Errorf("first client served %v after a backend came back, want within one interval (%v) plus the rebuild delay and slack", served, interval)
		}
	})

	t.Run("panic_mode all", func(t *testing.T) {
		top := newTopology(t, 1, 4, 2)
		echoSvc := echoService(t, top, "echo", echoPort, false, echo)
		// The checks probe a port where nothing listens: every backend is
		// down while traffic would work.
		svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends,
			Extra: "panic_mode = \"all\"\npassive_fall = 0", Health: tcpCheck(interval, timeout, rise, fall) + "port = 7999\n"}
		l := startLB(t, top.LB, healthConf(svc))
		if _, _, err := waitLog(l.process, 0, 5*time.Second, "panic_mode"); err != nil {
			t.Fatal(err)
		}
		c := top.Clients[0]
		reached := map[string]int{}
		for _, src := range c.Addrs4 {
			name, _, err := greeting(c.NS, src, svc.Listen)
			if err != nil {
				t.Fatalf("panic_mode all with every check failing: %v", err)
			}
			reached[name]++
		}
		t.Logf("panic mode: clients reached %v", reached)
	})
}

// TestHealthOnDown makes one backend's checks fail (on a check port of its
// own) while clients hold connections to both: with on_down = "close" the
// connections to the backend marked down are closed and the others live
// on; with "keep" all live on.
func TestHealthOnDown(t *testing.T) {
	const checkPort = 7001
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 2
	for _, onDown := range []string{"close", "keep"} {
		t.Run(onDown, func(t *testing.T) {
			top := newTopology(t, 1, 8, 2)
			echoSvc := echoService(t, top, "echo", echoPort, false, echo)
			for _, b := range top.Backends {
				startBackend(t, b.NS, b.Name, netip.AddrPortFrom(b.Addr4, checkPort), echo)
			}
			svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends,
				Extra:  fmt.Sprintf("on_down = %q", onDown),
				Health: tcpCheck(interval, timeout, rise, fall) + fmt.Sprintf("port = %d\n", checkPort)}
			l := startLB(t, top.LB, healthConf(svc))
			waitAllUp(t, l, svc.Backends)

			type held struct {
				name string
				conn *net.TCPConn
				br   *bufio.Reader
			}
			var conns []held
			c := top.Clients[0]
			for _, src := range c.Addrs4 {
				conn, err := dialFrom(c.NS, src, svc.Listen)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(ioTimeout))
				br := bufio.NewReader(conn)
				name, err := readGreeting(br)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, held{name, conn, br})
			}
			victim := top.Backends[0]
			perBackend := map[string]int{}
			for _, h := range conns {
				perBackend[h.name]++
			}
			if perBackend[victim.Name] == 0 || perBackend[top.Backends[1].Name] == 0 {
				t.Fatalf("connections per backend %v: want some on each", perBackend)
			}

			mark := logMark(l.process)
			nftBlock(t, victim.NS, checkPort, "reject")
			if _, _, err := waitLog(l.process, mark, fall*interval+timeout+healthSlack, transitionTo(svc.Backends[0], "down")...); err != nil {
				t.Fatal(err)
			}
			if _, _, err := waitLog(l.process, mark, time.Second, "routing table rebuilt"); err != nil {
				t.Fatal(err)
			}
			for i, h := range conns {
				if h.name != victim.Name || onDown == "keep" {
					roundTrip(t, h.conn, h.br, fmt.Sprintf("connection %d to %s after %s went down with on_down %s", i, h.name, victim.Name, onDown))
					continue
				}
				h.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
				if b, err := h.br.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("connection %d to %s, marked down with on_down close: read %q, %v; want EOF or a reset", i, h.name, b, err)
				}
			}
			if onDown == "close" {
				if _, _, err := waitLog(l.process, mark, time.Second, "closed the connections of a backend marked down", fmt.Sprintf("connections=%d", perBackend[victim.Name])); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// TestHealthPassive refuses connects to one backend with nftables while a
// client loop runs. The active check would need 10 failed probes a second
// apart; the data path's failed connects mark it down after passive_fall
// (3) of them, well before. Once the reject goes, the active check brings
// it back after rise successes.
func TestHealthPassive(t *testing.T) {
	const interval, timeout, rise, fall = time.Second, 500 * time.Millisecond, 2, 10
	top := newTopology(t, 1, 6, 2)
	echoSvc := echoService(t, top, "echo", echoPort, false, echo)
	svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends,
		Extra: "passive_fall = 3", Health: tcpCheck(interval, timeout, rise, fall)}
	l := startLB(t, top.LB, healthConf(svc))
	waitAllUp(t, l, svc.Backends)
	loop := startClientLoop(t, top.Clients[0], svc.Listen, greet)
	time.Sleep(200 * time.Millisecond)

	victim := svc.Backends[0]
	mark := logMark(l.process)
	rejected := time.Now()
	nftBlock(t, top.Backends[0].NS, echoPort, "reject")
	at, _, err := waitLog(l.process, mark, 2*time.Second, append(transitionTo(victim, "down"), "passive: 3 connects in a row failed")...)
	if err != nil {
		t.Fatalf("passive detection: %v", err)
	}
	t.Logf("passive detection marked the backend down %v after the reject rule (the active check alone: about %v)", at.Sub(rejected).Round(time.Millisecond), fall*interval)

	mark = logMark(l.process)
	restored := time.Now()
	nftUnblock(t, top.Backends[0].NS)
	at, _, err = waitLog(l.process, mark, rise*interval+healthSlack, append(transitionTo(victim, "up"), "2 consecutive probes succeeded")...)
	if err != nil {
		t.Fatalf("after the reject rule went: %v", err)
	}
	t.Logf("active check brought it back %v after the rule went (bound %v + slack)", at.Sub(restored).Round(time.Millisecond), rise*interval)
	loop.check(t, time.Time{})
}
