package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// tcpServer runs a TCP service with workers listening sockets, for the
// upgrader to pass on.
func tcpServer(t *testing.T, workers int) *l4.Server {
	t.Helper()
	cfg, err := config.Parse([]byte(fmt.Sprintf(`[admin]
listen = ""
[services.up]
listen = "127.0.0.1:%d"
workers = %d
[services.up.health]
kind = "none"
[[services.up.backends]]
address = %q
`, testPort(t), workers, tcpEcho(t))), "l4lb.toml")
	if err != nil {
		t.Fatal(err)
	}
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	if _, err := srv.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	return srv
}

// An upgrade closes each duplicate it made of a listening socket once: a
// second close, after the number was freed, closes whatever the process
// opened under it meanwhile (a client's connection, accepted by an event
// loop that takes the lowest free number). Here another goroutine keeps
// opening /dev/null while upgrades that cannot start run.
func TestUpgradeStartClosesEachDescriptorOnce(t *testing.T) {
	srv := tcpServer(t, 8)
	up := &upgrader{log: hclog.NewNullLogger(), srv: srv, adm: &admin{}, path: "/nonexistent/l4lb"}
	var devNull unix.Stat_t
	if err := unix.Stat("/dev/null", &devNull); err != nil {
		t.Fatal(err)
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	var lost atomic.Int64
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				continue
			}
			ours := true
			for range 50 {
				var st unix.Stat_t
				if unix.Fstat(fd, &st) != nil || st.Rdev != devNull.Rdev || st.Ino != devNull.Ino {
					ours = false
					break
				}
			}
			if !ours {
				// Closed under us, maybe reopened as something else:
				// not ours to close.
				lost.Add(1)
				continue
			}
			if unix.Close(fd) != nil {
				lost.Add(1)
			}
		}
	}()
	for range 300 {
		if _, _, err := up.run(context.Background()); err == nil {
			t.Fatal("an upgrade to a binary that does not exist started")
		}
	}
	close(stop)
	<-stopped
	if n := lost.Load(); n > 0 {
		t.Errorf("%d descriptors of another goroutine were closed by upgrades", n)
	}
}

// The admin endpoint's socket, passed to an upgrade that fails, stays
// non-blocking: it is one socket with the one passed, and exec puts a
// net.Listener's File() into blocking mode. An accept on a blocking socket
// waits in the kernel for the next client, and closing the endpoint
// (a reload that moves it, the stop) waits for that accept.
func TestFailedUpgradeKeepsAdminSocketNonBlocking(t *testing.T) {
	adminAddr := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	adm := &admin{log: hclog.NewNullLogger(), handler: http.NotFoundHandler()}
	ln, err := adm.prepare(adminAddr)
	if err != nil {
		t.Fatal(err)
	}
	adm.commit(adminAddr, ln)
	up := &upgrader{log: hclog.NewNullLogger(), srv: tcpServer(t, 1), adm: adm, path: "/nonexistent/l4lb"}
	if _, _, err := up.run(context.Background()); err == nil {
		t.Fatal("an upgrade to a binary that does not exist started")
	}
	err = adm.ln.control(func(fd int) error {
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err == nil && flags&unix.O_NONBLOCK == 0 {
			err = errors.New("blocking")
		}
		return err
	})
	if err != nil {
		t.Errorf("the admin socket after a failed upgrade: %v", err)
	}

	// A request, after which the endpoint's accept loop waits for the next.
	res, err := http.Get("http://" + adminAddr + "/")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	time.Sleep(100 * time.Millisecond)
	closed := make(chan struct{})
	go func() {
		adm.close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Error("closing the admin endpoint waits for a client")
		if c, err := net.Dial("tcp", adminAddr); err == nil { // the one it waits for
			c.Close()
		}
		<-closed
	}
}

// upgrade sends SIGUSR2 to the l4lb p runs and returns the pid of the new
// process once the old one has handed over to it. The new process is
// killed at the end of the test, before p (whose log pipe it holds).
func (p *runProc) upgrade(t *testing.T) int {
	t.Helper()
	seen := len(p.entries("upgrade: the new process is ready"))
	failed := len(p.entries("upgrade failed"))
	pid := p.startUpgrade(t)
	for end := time.Now().Add(15 * time.Second); len(p.entries("upgrade: the new process is ready")) == seen; {
		if lines := p.entries("upgrade failed"); len(lines) > failed {
			t.Fatal(lines[failed])
		}
		if time.Now().After(end) {
			t.Fatalf("the new process (pid %d) was not ready within 15 s", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return pid
}

// startUpgrade sends SIGUSR2 to the l4lb p runs and returns the pid of
// the new process once started, to be killed at the end of the test.
func (p *runProc) startUpgrade(t *testing.T) int {
	t.Helper()
	seen := len(p.entries("upgrade: new process started"))
	p.cmd.Process.Signal(syscall.SIGUSR2)
	for end := time.Now().Add(10 * time.Second); len(p.entries("upgrade: new process started")) == seen; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("no new process started within 10 s of SIGUSR2")
		}
	}
	line := p.entries("upgrade: new process started")[seen]
	m := regexp.MustCompile(` pid=(\d+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no pid in %q", line)
	}
	pid, _ := strconv.Atoi(m[1])
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	return pid
}

// entries returns the log lines so far that contain text.
func (p *runProc) entries(text string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, l := range p.lines {
		if strings.Contains(l, text) {
			out = append(out, l)
		}
	}
	return out
}

// waitGone waits for pid to exit (a zombie counts: it holds nothing).
func waitGone(t *testing.T, pid int, within time.Duration) {
	t.Helper()
	for end := time.Now().Add(within); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		s := string(b)
		if strings.HasPrefix(strings.TrimSpace(s[strings.LastIndexByte(s, ')')+1:]), "Z") {
			return
		}
	}
	t.Fatalf("pid %d still runs %s later", pid, within)
}

// Once it has handed over, the old process leaves the pidfile's lock to
// the new one: it no longer accepts, so a later l4lb splits no clients
// with it. Should the new one die without removing the file (a crash, the
// OOM killer), a lock the old one kept would refuse the l4lb started in
// its place for as long as the drain lasts, naming the dead process.
func TestUpgradedProcessReleasesPidfileLock(t *testing.T) {
	backend, accepted := silentBackend(t)
	run, _, listen, pidfile := runWithPidfile(t, backend)
	client := dialThrough(t, listen, accepted)
	defer client.Close()
	pid := run.upgrade(t)
	run.waitLog(t, "draining before exit: service=demo connections=1", 5*time.Second)

	syscall.Kill(pid, syscall.SIGKILL)
	waitGone(t, pid, 10*time.Second)
	select {
	case <-run.exited:
		t.Fatal("the old process exited while its connection was open")
	default:
	}
	// The kernel may release a killed process's files a moment after it
	// shows as a zombie.
	var err error
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		var f *os.File
		if f, err = lockPidfile(pidfile); err == nil {
			f.Close()
			return
		}
	}
	t.Errorf("the pidfile once the new process has died, the old one still draining: %v", err)
}

// A process an upgrade started that stops before it is ready (the old one
// stops it at upgradeTimeout, or anyone signals it) says nothing to
// systemd: it is not the service's main process, and with NotifyAccess=all
// a STOPPING=1 from it would put the whole unit into its stop, which
// kills the old process, serving on, once TimeoutStopSec passes.
func TestUpgradeStoppedWhileStartingTellsSystemdNothing(t *testing.T) {
	messages := notifySocket(t)
	silent, probed := silentBackend(t)
	path, listen := awaitedCheckConfig(t, "", silent)
	run := startRun(t, "-config", path)
	awaitProbe(t, probed)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	for end := time.Now().Add(5 * time.Second); len(messages()) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("systemd heard no READY=1 from the running l4lb")
		}
	}
	before := len(messages())

	run.cmd.Process.Signal(syscall.SIGUSR2)
	line := run.waitLog(t, "upgrade: new process started", 10*time.Second)
	pid, _ := strconv.Atoi(regexp.MustCompile(` pid=(\d+)`).FindStringSubmatch(line)[1])
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	// Its second line comes after it subscribed to signals; then it waits
	// for its first checks, up to 2 s.
	for end := time.Now().Add(10 * time.Second); len(run.entries("descriptor limit")) < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the new process did not start")
		}
	}
	time.Sleep(200 * time.Millisecond)
	syscall.Kill(pid, syscall.SIGTERM)
	run.waitLog(t, "upgrade failed: still serving", 10*time.Second)
	for _, m := range messages()[before:] {
		t.Errorf("systemd was sent %q by the upgrade that failed", m)
	}
	c, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatalf("the old process after the failed upgrade: %v", err)
	}
	c.Close()
}

// An upgrade whose new process cannot run as process.user (the config
// now names another user than the one the running l4lb dropped root
// for) fails before the new process serves a client, which its exit
// would cut, or writes its pid into the pidfile, which the old one keeps.
func TestUpgradeToAnotherUserFailsBeforeServing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (make test runs as root), to drop it")
	}
	// Everything the processes read once they run as nobody.
	dir, err := os.MkdirTemp("", "l4lb-upgrade-user")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "l4lb")
	exe, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path, pidfile := filepath.Join(dir, "l4lb.toml"), filepath.Join(dir, "l4lb.pid")
	write := func(user string) {
		t.Helper()
		text := fmt.Sprintf("[process]\nuser = %q\n[admin]\nlisten = \"\"\n[services.demo]\nlisten = %q\n[services.demo.health]\nkind = \"none\"\n[[services.demo.backends]]\naddress = %q\n",
			user, listen, tcpEcho(t))
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("nobody")
	run := startRunBinary(t, bin, "-config", path, "-pidfile", pidfile)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)

	write("daemon")
	run.cmd.Process.Signal(syscall.SIGUSR2)
	line := run.waitLog(t, "upgrade: new process started", 10*time.Second)
	pid, _ := strconv.Atoi(regexp.MustCompile(` pid=(\d+)`).FindStringSubmatch(line)[1])
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	run.waitLog(t, "upgrade failed: still serving", 10*time.Second)
	if n := len(run.entries("service started")); n != 1 {
		t.Errorf("%d \"service started\" lines: the new process served before it failed", n)
	}
	if b, err := os.ReadFile(pidfile); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(run.cmd.Process.Pid) {
		t.Errorf("the pidfile after the failed upgrade: %q, %v; want the running l4lb's pid %d", b, err, run.cmd.Process.Pid)
	}
	if c, err := net.Dial("tcp", listen); err != nil {
		t.Errorf("the old process after the failed upgrade: %v", err)
	} else {
		c.Close()
	}
}

// A SIGHUP that reaches the old process during an upgrade waits for it
// (a reload then could bind a service the new process never sees), and
// once the new process serves it is passed on to it: the new process
// applies the changed file, the old one applies nothing.
func TestSIGHUPDuringUpgradeReloadsTheNewProcess(t *testing.T) {
	silent, probed := silentBackend(t)
	path, _ := awaitedCheckConfig(t, "", silent)
	run := startRun(t, "-config", path)
	awaitProbe(t, probed)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)

	run.startUpgrade(t)
	// Once the new process has read the file (it logs its limits after),
	// it waits up to 2 s for its first check.
	for end := time.Now().Add(10 * time.Second); len(run.entries("descriptor limit")) < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the new process did not start")
		}
	}
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(text), "[[services.demo.backends]]\n", "[[services.demo.backends]]\nweight = 50\n", 1)
	if err := os.WriteFile(path, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	run.cmd.Process.Signal(syscall.SIGHUP)
	if len(run.entries("upgrade: the new process is ready")) > 0 {
		t.Fatal("the new process was ready before the SIGHUP: the test did not send it during the upgrade")
	}
	run.waitLog(t, "upgrade: passing on the SIGHUP that came during it", 10*time.Second)
	run.waitLog(t, "reloaded: trigger=SIGHUP version=1 new_version=2", 10*time.Second)
	if n := len(run.entries("reloaded:")); n != 1 {
		t.Errorf("%d reloads logged, want only the new process's: %q", n, run.entries("reloaded:"))
	}
	// Its exit: the new process holds the log pipe, so its end is not
	// the log's.
	waitGone(t, run.cmd.Process.Pid, 10*time.Second)
}

// fakeSuccessor writes a shell script to start in place of l4lb by an
// upgrade: $pidfd and $readyfd are the descriptors of the pidfile and of
// the readiness pipe passed to it, and body does what it will with them.
func fakeSuccessor(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "l4lb")
	script := `#!/bin/sh
i=3
IFS=,
for role in $L4LB_UPGRADE_FDS; do
	case $role in
	pidfile) pidfd=$i ;;
	ready) readyfd=$i ;;
	esac
	i=$((i+1))
done
unset IFS
` + body + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

// ownPidfile is a pidfile locked by this process, with its pid in it, as
// l4lb run keeps one.
func ownPidfile(t *testing.T) *os.File {
	t.Helper()
	pidfile, err := lockPidfile(filepath.Join(t.TempDir(), "l4lb.pid"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pidfile.Close() })
	if err := writePid(pidfile); err != nil {
		t.Fatal(err)
	}
	return pidfile
}

// A new process that wrote its pid and then failed leaves the pidfile to
// the process that serves on: `l4lb reload -pidfile` would otherwise
// signal a dead process (or whatever reuses its number), and `l4lb
// upgrade -pidfile` take the failure for a success.
func TestFailedUpgradeRestoresPidfile(t *testing.T) {
	pidfile := ownPidfile(t)
	up := &upgrader{log: hclog.NewNullLogger(), srv: tcpServer(t, 1), adm: &admin{}, pidfile: pidfile,
		path: fakeSuccessor(t, `echo $$ > /proc/self/fd/$pidfd; exit 1`)}
	if _, _, err := up.run(context.Background()); err == nil {
		t.Fatal("an upgrade whose new process failed succeeded")
	}
	b, err := os.ReadFile(pidfile.Name())
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != strconv.Itoa(os.Getpid()) {
		t.Errorf("after the failed upgrade the pidfile names %q, want this process, %d, which serves on", got, os.Getpid())
	}
}

// A new process that closed its readiness pipe without exiting (a
// wrapper or a binary that closes what it inherited) is stopped once this
// one stops, rather than waited for: the upgrade holds the reload lock,
// which the stop waits for.
func TestUpgradeStopsNewProcessThatClosedReadyPipe(t *testing.T) {
	up := &upgrader{log: hclog.NewNullLogger(), srv: tcpServer(t, 1), adm: &admin{},
		path: fakeSuccessor(t, `eval "exec $readyfd>&-"; exec sleep 20`)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := up.run(ctx)
		done <- err
	}()
	time.Sleep(500 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("an upgrade whose new process said nothing succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the upgrade still waits for its new process 5 s after this one began to stop")
	}
}

// The pidfile names the new process once it has said it is ready, and
// this side writes it: the new process, which may still fail before it
// says so, leaves the file alone.
func TestUpgradeWritesNewPidOnceReady(t *testing.T) {
	pidfile := ownPidfile(t)
	up := &upgrader{log: hclog.NewNullLogger(), srv: tcpServer(t, 1), adm: &admin{}, pidfile: pidfile,
		path: fakeSuccessor(t, `eval "printf x >&$readyfd"; exec sleep 20`)}
	pid, flows, err := up.run(context.Background())
	if pid > 0 {
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	}
	if err != nil {
		t.Fatalf("an upgrade whose new process said it was ready: %v", err)
	}
	flows.Close()
	b, err := os.ReadFile(pidfile.Name())
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(b)); got != strconv.Itoa(pid) {
		t.Errorf("after the upgrade the pidfile names %q, want the new process, %d", got, pid)
	}
}

// A stop signal while an upgrade's new process still waits for its first
// checks cancels the upgrade: the new process is stopped, never said
// ready, and the old one stops as asked.
func TestStopDuringUpgradeStopsTheNewProcess(t *testing.T) {
	silent, probed := silentBackend(t)
	path, _ := awaitedCheckConfig(t, "", silent)
	run := startRun(t, "-config", path)
	awaitProbe(t, probed)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	pid := run.startUpgrade(t)
	for end := time.Now().Add(10 * time.Second); len(run.entries("descriptor limit")) < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the new process did not start")
		}
	}
	run.cmd.Process.Signal(syscall.SIGTERM)
	waitGone(t, pid, 10*time.Second)
	waitGone(t, run.cmd.Process.Pid, 10*time.Second)
	if lines := run.entries("upgrade: the new process is ready"); len(lines) > 0 {
		t.Errorf("the upgrade went on after the stop signal: %q", lines)
	}
	if len(run.entries("stopping: no new connections")) == 0 {
		t.Error("the old process did not stop as a stop signal asks")
	}
}

// `l4lb upgrade -pidfile` has only the pidfile to go by. A failed
// upgrade writes the old pid into it again, and that write is the
// answer: the command reports the failure then, not when its wait for a
// new pid runs out.
func TestUpgradeWithPidfileReportsAFailure(t *testing.T) {
	backend, _ := silentBackend(t)
	run, path, _, pidfile := runWithPidfile(t, backend)
	if err := os.WriteFile(path, []byte("[services.demo]\nlisten = \"not an address\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr strings.Builder
	code := cmdUpgrade([]string{"-pidfile", pidfile}, &stdout, &stderr)
	want := fmt.Sprintf("upgrade failed, pid %d still serving", run.cmd.Process.Pid)
	if code != 1 || !strings.Contains(stderr.String(), want) {
		t.Errorf("l4lb upgrade -pidfile with a broken config: exit %d, stdout %q, stderr %q; want 1 and %q",
			code, stdout.String(), stderr.String(), want)
	}
	if lines := run.entries("upgrade failed: still serving"); len(lines) != 1 {
		t.Errorf("the old process logged %d upgrade failures, want 1", len(lines))
	}
}

// systemd learns of the new process as the service's main one from the
// old process, once the old one has read that the new one is ready:
// from then on nothing stops the new one, whereas one that named itself
// could be stopped by the old one's timeout just after.
func TestUpgradeOldProcessNamesTheNewOneMain(t *testing.T) {
	sockPath := filepath.Join(t.TempDir(), "notify")
	notifySock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notifySock.Close()
	rc, err := notifySock.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", sockPath)
	backend, _ := silentBackend(t)
	path, _ := stopConfig(t, backend, "", "1m")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	oldPid := run.cmd.Process.Pid
	newPid := run.upgrade(t)

	type message struct {
		from int32
		text string
	}
	var got []message
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); {
		notifySock.SetReadDeadline(end)
		n, oobn, _, _, err := notifySock.ReadMsgUnix(buf, oob)
		if err != nil {
			break
		}
		m := message{text: string(buf[:n])}
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(cmsgs) == 1 {
			if cred, err := unix.ParseUnixCredentials(&cmsgs[0]); err == nil {
				m.from = cred.Pid
			}
		}
		got = append(got, m)
		if strings.Contains(m.text, "MAINPID=") {
			break
		}
	}
	var mainFrom int32
	for _, m := range got {
		if strings.Contains(m.text, "MAINPID=") {
			if !strings.Contains(m.text, fmt.Sprintf("MAINPID=%d\n", newPid)) {
				t.Errorf("MAINPID names another process than the new one (pid %d): %q", newPid, m.text)
			}
			mainFrom = m.from
		}
	}
	if mainFrom != int32(oldPid) {
		t.Errorf("MAINPID came from pid %d, want the old process, %d; messages: %+v", mainFrom, oldPid, got)
	}
}

// runWithPidfile runs l4lb with a pidfile, one service in front of
// backend, until it is ready.
func runWithPidfile(t *testing.T, backend string) (run *runProc, path, listen, pidfile string) {
	t.Helper()
	path, listen = stopConfig(t, backend, "", "1m")
	pidfile = filepath.Join(t.TempDir(), "l4lb.pid")
	run = startRun(t, "-config", path, "-pidfile", pidfile)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	return run, path, listen, pidfile
}
