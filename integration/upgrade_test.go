package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// readPidfile returns the process id in path, or 0 while it is empty.
func readPidfile(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pidfile %s: %q", path, b)
	}
	return pid
}

// processGone reports whether pid has exited: no such process, or a
// zombie its parent has not reaped yet.
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) state ...: comm may hold spaces, the state follows the
	// last parenthesis.
	s := string(b)
	rest := s[strings.LastIndexByte(s, ')')+1:]
	return strings.HasPrefix(strings.TrimSpace(rest), "Z")
}

// l4lbIn runs the binary in namespace ns and returns its exit code and
// output.
func l4lbIn(t *testing.T, ns string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut strings.Builder
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, l4lbBin}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	timer := time.AfterFunc(time.Minute, func() { cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Run()
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("l4lb %s: %v", strings.Join(args, " "), err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errOut.String()
}

func waitGone(pid int, timeout time.Duration) bool {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if processGone(pid) {
			return true
		}
	}
	return false
}

// TestUpgrade replaces the running l4lb with a new process of its binary
// three times in a row (SIGUSR2), while a client opens short connections
// as fast as it can, long connections stream, and UDP flows exchange
// datagrams. Not one connection may fail, no accept queue may drop one,
// every stream carries every byte through the process that accepted it,
// every datagram gets its reply from the same backend, which sees each
// UDP flow come from the same port throughout (the flows, sockets and
// all, pass to each new process), the pidfile and the
// admin endpoint move to each new process, and each old process exits
// once its last connection ends.
func TestUpgrade(t *testing.T) {
	const upgrades = 3
	top := newTopology(t, 1, 8, 2)
	widenPorts(t, top)
	c := top.Clients[0]
	b := backendAddrs(t, top, echoPort, nil)
	udp := udpEchoService(t, top, "game", udpEchoPort)
	udp.HashKey, udp.Idle = "source_ip", "2s"
	const adminAddr = "127.0.0.1:9901"
	conf := strings.Replace(rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Drain: "40s", Backends: weighted(b...)}}}.String(),
		`listen = ""`, fmt.Sprintf("listen = %q", adminAddr), 1) + udp.toml()
	pidfile := filepath.Join(t.TempDir(), "l4lb.pid")
	l := startLB(t, top.LB, conf, "-pidfile", pidfile)
	// Cleanups run last first: this one, before startLB's, stops the
	// newest process, which holds the first one's output pipes.
	t.Cleanup(func() {
		pid := readPidfile(t, pidfile)
		if pid == 0 || pid == l.cmd.Process.Pid {
			return
		}
		syscall.Kill(pid, syscall.SIGTERM)
		if !waitGone(pid, stopTimeout) {
			t.Errorf("the newest l4lb (pid %d) did not exit within %v of SIGTERM; killed it", pid, stopTimeout)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})

	var streams []*stream
	for i, src := range c.Addrs4[4:6] {
		streams = append(streams, startStream(t, c.NS, src, netip.AddrPortFrom(vip4, echoPort), uint64(i)+7))
	}
	var loops []*udpLoop
	for _, src := range c.Addrs4[6:8] {
		udpClient := newUDPClient(t, c.NS, src, udp.Listen)
		loops = append(loops, startUDPLoop(udpClient, 20*time.Millisecond))
	}
	before := listenCounters(t, top.LB)
	tr := startTraffic(t, c, netip.AddrPortFrom(vip4, echoPort), 4)
	time.Sleep(300 * time.Millisecond)

	pids := []int{l.cmd.Process.Pid}
	for i := range upgrades {
		old := pids[len(pids)-1]
		if got := readPidfile(t, pidfile); got != old {
			t.Fatalf("before upgrade %d the pidfile names %d, want %d", i+1, got, old)
		}
		if i == 1 {
			// The command, which waits for the result.
			code, stdout, stderr := l4lbIn(t, top.LB, "upgrade", "-admin", adminAddr)
			if code != 0 || !strings.Contains(stdout, fmt.Sprintf("pid %d drains", old)) {
				t.Fatalf("l4lb upgrade -admin: exit %d\n%s%s", code, stdout, stderr)
			}
		} else if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		next := 0
		for end := time.Now().Add(15 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if pid := readPidfile(t, pidfile); pid != 0 && pid != old {
				next = pid
				break
			}
		}
		if next == 0 {
			t.Fatalf("upgrade %d: the pidfile still names %d after 15 s", i+1, old)
		}
		if _, err := l.waitEntries("upgrade: the new process is ready", i+1, 5*time.Second); err != nil {
			t.Fatalf("upgrade %d: %v", i+1, err)
		}
		pids = append(pids, next)
		time.Sleep(500 * time.Millisecond)
	}
	if processGone(pids[0]) {
		t.Errorf("the first l4lb (pid %d) exited while its streams were open (drain_timeout 40s)", pids[0])
	}
	for _, pid := range pids[1:upgrades] {
		if !waitGone(pid, 10*time.Second) {
			t.Errorf("l4lb pid %d, upgraded from and without long connections, still runs 10 s later", pid)
		}
	}
	for i, s := range streams {
		close(s.stopc)
		<-s.done
		if s.err != nil {
			t.Errorf("stream %d (on %s), started before the upgrades: %v", i, s.name, s.err)
		} else {
			t.Logf("stream %d (on %s): %d bytes through the first l4lb, intact", i, s.name, s.sent)
		}
	}
	if !waitGone(pids[0], 10*time.Second) {
		t.Errorf("the first l4lb (pid %d) still runs 10 s after its last stream ended", pids[0])
	}
	tr.check(t, fmt.Sprintf("short connections through %d upgrades", upgrades))
	after := listenCounters(t, top.LB)
	for k, v := range after {
		if v > before[k] {
			t.Errorf("%s rose from %d to %d during the upgrades", k, before[k], v)
		}
	}
	for _, lp := range loops {
		replies := lp.finish()
		lost := 0
		for _, r := range replies {
			if r.backend == "" {
				lost++
			} else if r.backend != replies[0].backend || r.seen != replies[0].seen {
				t.Errorf("UDP flow from %s: reply from %s, which saw the flow from %s; the first ones from %s, which saw it from %s",
					lp.c.src, r.backend, r.seen, replies[0].backend, replies[0].seen)
				break
			}
		}
		t.Logf("UDP flow from %s: %d exchanges through %d upgrades, %d without a reply", lp.c.src, len(replies), upgrades, lost)
		if lost > 0 {
			t.Errorf("UDP flow from %s: %d of %d datagrams got no reply", lp.c.src, lost, len(replies))
		}
	}

	out, err := exec.Command("ip", "netns", "exec", top.LB, l4lbBin, "status", "-admin", adminAddr, "-json").Output()
	if err != nil {
		t.Fatalf("l4lb status after the upgrades: %v", err)
	}
	var status struct {
		Version  int  `json:"version"`
		Stopping bool `json:"stopping"`
	}
	if err := json.Unmarshal(out, &status); err != nil || status.Version != 1 || status.Stopping {
		t.Errorf("status after the upgrades: %+v, %v; want the newest process's: version 1, not stopping\n%s", status, err, out)
	}
	if passed := l.entries("upgrade: UDP flows passed to the new process"); len(passed) != upgrades {
		t.Errorf("%d log lines of UDP flows passed, want one per upgrade:\n%s", len(passed), strings.Join(passed, "\n"))
	}
	if errs := l.entries("[ERROR]"); len(errs) > 0 {
		t.Errorf("l4lb logged errors: %s", strings.Join(errs, "\n"))
	}
}

// TestUpgradeFailureKeepsServing makes an upgrade's new process fail (the
// config file has become invalid): `l4lb upgrade` and the running l4lb
// say why, and it keeps serving, with its pidfile; a later upgrade with
// the file fixed succeeds.
func TestUpgradeFailureKeepsServing(t *testing.T) {
	top := newTopology(t, 1, 1, 1)
	c := top.Clients[0]
	b := backendAddrs(t, top, echoPort, nil)
	const adminAddr = "127.0.0.1:9901"
	conf := strings.Replace(rconf{Services: []rsvc{{Name: "echo", Port: echoPort, Backends: weighted(b...)}}}.String(),
		`listen = ""`, fmt.Sprintf("listen = %q", adminAddr), 1)
	pidfile := filepath.Join(t.TempDir(), "l4lb.pid")
	l := startLB(t, top.LB, conf, "-pidfile", pidfile)
	t.Cleanup(func() {
		if pid := readPidfile(t, pidfile); pid != 0 && pid != l.cmd.Process.Pid {
			syscall.Kill(pid, syscall.SIGTERM)
			if !waitGone(pid, stopTimeout) {
				t.Errorf("the new l4lb (pid %d) did not exit within %v of SIGTERM", pid, stopTimeout)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	dst := netip.AddrPortFrom(vip4, echoPort)
	payload := makePayloads(1, 1<<10)[0]

	replaceFile(t, l.Path, []byte("bogus = 1\n"+conf))
	code, _, stderr := l4lbIn(t, top.LB, "upgrade", "-admin", adminAddr)
	if code != 1 || !strings.Contains(stderr, fmt.Sprintf("upgrade failed, pid %d still serving", l.cmd.Process.Pid)) {
		t.Errorf("l4lb upgrade to a process that fails: exit %d, stderr %q", code, stderr)
	}
	failed, err := l.waitEntries("upgrade failed: still serving", 1, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(l.Output(), "bogus: unknown key") {
		t.Errorf("the new process's reason is not in the log; got %s", failed[0])
	}
	if got := readPidfile(t, pidfile); got != l.cmd.Process.Pid {
		t.Errorf("after the failed upgrade the pidfile names %d, want the running %d", got, l.cmd.Process.Pid)
	}
	for i := range 20 {
		if _, _, err := shortEcho(c.NS, c.Addrs4[0], dst, payload); err != nil {
			t.Fatalf("connection %d after the failed upgrade: %v", i, err)
		}
	}

	replaceFile(t, l.Path, []byte(conf))
	code, stdout, stderr := l4lbIn(t, top.LB, "upgrade", "-pidfile", pidfile)
	if code != 0 || !strings.Contains(stdout, "upgraded: pid") {
		t.Fatalf("l4lb upgrade -pidfile: exit %d\n%s%s", code, stdout, stderr)
	}
	if _, err := l.waitEntries("upgrade: the new process is ready", 1, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if !waitGone(l.cmd.Process.Pid, 10*time.Second) {
		t.Errorf("the upgraded-from l4lb still runs 10 s after the upgrade, with no connection open")
	}
	for i := range 20 {
		if _, _, err := shortEcho(c.NS, c.Addrs4[0], dst, payload); err != nil {
			t.Fatalf("connection %d after the upgrade: %v", i, err)
		}
	}
}
