package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/l4"
)

// A binary upgrade, as nginx's SIGUSR2 and HAProxy's seamless reload do
// it: on SIGUSR2 the running l4lb starts the binary at its own path anew,
// with the same arguments, and passes it its listening sockets, its admin
// socket and its locked pidfile. The new process reads the config, serves
// from those same sockets (so that no client queued on them is reset, and
// none is refused in between), and says when it is ready. Then the old one
// stops accepting and drains its connections as a stop does, and exits.
// If the new one fails (a bad config, a binary that does not start) or is
// not ready within upgradeTimeout, the old one says why and keeps serving.

// upgradeEnv tells a process started by an upgrade what its descriptors
// from 3 on are: a comma-separated role for each, in order: "listen" (a
// service's listening socket, which describes itself), "admin=ADDR" (the
// admin endpoint's socket, for admin.listen = ADDR), "pidfile" (the
// pidfile, locked) and "ready" (a SOCK_SEQPACKET socket: one byte says
// that the new process is ready, and the old one then passes its UDP
// flows over it, l4/flowpass.go; a pipe, from an l4lb that passes none,
// takes the byte alone).
const upgradeEnv = "L4LB_UPGRADE_FDS"

// upgradeTimeout bounds the wait for the new process: it reads the config
// and waits for its services' first health checks (at most about 2 s
// each, side by side), so anything near this is a process that hangs.
const upgradeTimeout = 30 * time.Second

// inheritance is what an upgrade passed to this process.
type inheritance struct {
	sockets []l4.ListenSocket
	// admin serves adminAddr, the admin.listen of the process that passed it.
	admin     net.Listener
	adminAddr string
	pidfile   *os.File
	ready     *os.File
	// flows is ready as a socket, to take the UDP flows over; nil when
	// ready is a pipe.
	flows *net.UnixConn
}

// inheritedFromEnv reads what an upgrade passed (nil when this process
// was not started by one) and takes upgradeEnv out of the environment.
func inheritedFromEnv() (*inheritance, error) {
	roles, ok := os.LookupEnv(upgradeEnv)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(upgradeEnv)
	inh := &inheritance{}
	for i, role := range strings.Split(roles, ",") {
		fd := 3 + i
		// A later upgrade passes duplicates: these must not leak into it.
		unix.CloseOnExec(fd)
		var err error
		switch kind, arg, _ := strings.Cut(role, "="); kind {
		case "listen":
			var s l4.ListenSocket
			if s, err = l4.InheritedSocket(fd); err == nil {
				inh.sockets = append(inh.sockets, s)
			}
		case "admin":
			f := os.NewFile(uintptr(fd), "admin")
			inh.admin, err = net.FileListener(f)
			f.Close()
			inh.adminAddr = arg
		case "pidfile":
			inh.pidfile = os.NewFile(uintptr(fd), "pidfile")
		case "ready":
			inh.ready = os.NewFile(uintptr(fd), "upgrade ready")
			var st unix.Stat_t
			if unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
				c, cerr := net.FileConn(inh.ready)
				if cerr != nil {
					err = cerr
					break
				}
				inh.flows, _ = c.(*net.UnixConn)
				inh.ready.Close()
				inh.ready = nil
				if inh.flows == nil {
					c.Close()
					err = errors.New("not a unix socket")
				}
			}
		default:
			err = fmt.Errorf("unknown role %q", role)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: descriptor %d: %w", upgradeEnv, fd, err)
		}
	}
	return inh, nil
}

// takeAdmin returns the inherited admin socket if it serves addr, and
// closes it otherwise.
func (inh *inheritance) takeAdmin(addr string) net.Listener {
	if inh == nil || inh.admin == nil {
		return nil
	}
	ln := inh.admin
	inh.admin = nil
	if addr != inh.adminAddr {
		ln.Close()
		return nil
	}
	return ln
}

// takePidfile returns the inherited pidfile, locked by this process too
// (the lock belongs to the open file, which the upgrade shared), or nil.
// The process that passed it writes this one's pid into it, once this
// one has said it is ready.
func (inh *inheritance) takePidfile() (*os.File, error) {
	if inh == nil || inh.pidfile == nil {
		return nil, nil
	}
	f := inh.pidfile
	inh.pidfile = nil
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("the pidfile passed by the upgrade is not locked by it: %w", err)
	}
	return f, nil
}

// onSocket says whether the process that started this one answers on a
// socket once this one is ready: it then names this one systemd's main
// process and passes its UDP flows, which the UDP services wait for
// (l4.Server.HoldInheritedUDP).
func (inh *inheritance) onSocket() bool { return inh != nil && inh.flows != nil }

// abandon tells the process that started this one, by closing the
// socket or pipe it waits on, that this one will not serve.
func (inh *inheritance) abandon() {
	if inh == nil {
		return
	}
	if inh.flows != nil {
		inh.flows.Close()
		inh.flows = nil
	}
	if inh.ready != nil {
		inh.ready.Close()
		inh.ready = nil
	}
}

// sayReady tells the process that started this one that it serves.
func (inh *inheritance) sayReady() error {
	if inh.onSocket() {
		_, err := inh.flows.Write([]byte{'R'})
		return err
	}
	if inh == nil || inh.ready == nil {
		return nil
	}
	_, err := inh.ready.Write([]byte{1})
	inh.ready.Close()
	inh.ready = nil
	return err
}

// takeFlows takes the UDP flows the process that started this one
// passes, once sayReady has told it to, and lets the UDP services read
// their sockets. True once that process has said it is done: it serves
// no more.
func (inh *inheritance) takeFlows(srv *l4.Server, log hclog.Logger) (done bool) {
	if !inh.onSocket() {
		return false
	}
	began := time.Now()
	// Twice the old process's bound, which starts later: should the
	// passing stall, the old one gives up first and keeps what it has
	// not passed, rather than this one reading the sockets while that
	// one still passes flows.
	taken, refused, err := srv.TakeFlows(inh.flows, 2*l4.FlowPassTimeout)
	inh.flows.Close()
	inh.flows = nil
	args := []any{"taken", taken, "left_to_it", refused, "took", time.Since(began).Round(time.Microsecond).String()}
	if err != nil {
		log.Warn("upgrade: UDP flows not all taken from the process that started this one", append(args, "error", err)...)
		return false
	}
	if taken+refused > 0 {
		log.Info("upgrade: UDP flows taken from the process that started this one, sockets and all", args...)
	}
	return true
}

// handOverFlows has the UDP services read their listening sockets no
// more, and passes their flows over flows, the socket to the new process
// that reads them now (nil: none, the flows stay here), then closes it.
func handOverFlows(srv *l4.Server, flows *net.UnixConn, log hclog.Logger) {
	began := time.Now()
	passed, err := srv.HandOver(flows)
	if flows != nil {
		flows.Close()
	}
	args := []any{"passed", passed.Passed, "kept", passed.Kept, "took", time.Since(began).Round(time.Microsecond).String(),
		"udp_paused", passed.Paused.Round(time.Microsecond).String()}
	if err != nil {
		log.Warn("upgrade: UDP flows not all passed to the new process; the rest stay here until they idle out", append(args, "error", err)...)
	} else if passed.Passed+passed.Kept > 0 {
		log.Info("upgrade: UDP flows passed to the new process, sockets and all; those its config does not take stay here until they idle out", args...)
	}
}

// ownPath is how this process was started, as a path to start it again:
// argv[0], so that a symlink to the binary, swapped to a new version,
// starts the new version.
func ownPath() (string, error) {
	path := os.Args[0]
	if !strings.Contains(path, "/") {
		var err error
		if path, err = exec.LookPath(path); err != nil {
			return os.Executable()
		}
	}
	return filepath.Abs(path)
}

// upgrader starts the new process of a binary upgrade.
type upgrader struct {
	log     hclog.Logger
	srv     *l4.Server
	adm     *admin
	rl      *reloader
	path    string // ownPath at start; "" if unknown
	args    []string
	pidfile *os.File // locked; nil without -pidfile
	notify  *notifier
}

// upgradeResult is how an upgrade ended: the new process's pid, and nil
// once it serves, or why it does not (pid 0 if it never started).
type upgradeResult struct {
	pid int
	err error
	// flows is the socket to the new process that serves, to pass it the
	// UDP flows (l4.Server.HandOver); nil unless err is.
	flows *net.UnixConn
}

// errUpgradeCancelled answers the requests of an upgrade that l4lb's
// stop cancelled.
var errUpgradeCancelled = errors.New("l4lb is stopping: the upgrade was cancelled")

// upgrade is one upgrade under way.
type upgrade struct {
	done   <-chan upgradeResult
	cancel context.CancelFunc
}

// start runs an upgrade in the background. Reloads wait meanwhile, and
// after one that succeeded this process reloads no more: a service a
// reload added here would be bound by this process alone, and its
// sockets closed with it.
func (u *upgrader) start() *upgrade {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan upgradeResult, 1)
	go func() {
		var res upgradeResult
		res.err = u.rl.handOver(func() error {
			res.pid, res.flows, res.err = u.run(ctx)
			return res.err
		})
		done <- res
	}()
	return &upgrade{done: done, cancel: cancel}
}

// run starts the new process and waits until it serves, fails, or ctx
// ends (this process stops). Once it serves, flows is the socket to
// pass it the UDP flows over.
func (u *upgrader) run(ctx context.Context) (pid int, flows *net.UnixConn, err error) {
	defer func() {
		// On every failure the pidfile is written again: it must name
		// the process that serves on, for `l4lb reload -pidfile` and
		// `l4lb upgrade -pidfile` alike, whatever a failed new process
		// wrote into it (l4lb leaves that to this side, but a binary of
		// another version may not), and `l4lb upgrade -pidfile` takes a
		// write that leaves this pid as the sign of a failure.
		if err != nil && u.pidfile != nil {
			if werr := writePid(u.pidfile); werr != nil {
				u.log.Warn("upgrade: cannot write this process's pid back into the pidfile", "error", werr)
			}
		}
	}()
	if u.path == "" {
		return 0, nil, errors.New("this process's binary path is unknown")
	}
	if ctx.Err() != nil { // stopped while a reload held the upgrade back
		return 0, nil, errUpgradeCancelled
	}
	socks, err := u.srv.ListenSockets()
	if err != nil {
		return 0, nil, err
	}
	// In a closure: socks is emptied below once files own the
	// descriptors, and a second close would hit whatever reused them.
	defer func() { l4.CloseListenSockets(socks) }()
	var roles []string
	var files []*os.File
	defer func() {
		for _, f := range files {
			if f != u.pidfile {
				f.Close()
			}
		}
	}()
	for _, s := range socks {
		roles = append(roles, "listen")
		files = append(files, os.NewFile(uintptr(s.FD), "listen"))
	}
	// os.NewFile took the descriptors: closing files closes them.
	passed := len(socks)
	socks = nil
	if f, addr, err := u.adm.socketFile(); err != nil {
		return 0, nil, err
	} else if f != nil {
		roles = append(roles, "admin="+addr)
		files = append(files, f)
	}
	if u.pidfile != nil {
		roles = append(roles, "pidfile")
		files = append(files, u.pidfile)
	}
	ready, theirs, err := upgradeSocketPair()
	if err != nil {
		return 0, nil, err
	}
	defer func() {
		if err != nil {
			ready.Close()
		}
	}()
	roles = append(roles, "ready")
	files = append(files, theirs)

	cmd := exec.Command(u.path, u.args...)
	cmd.Env = append(withoutEnv(os.Environ(), upgradeEnv), upgradeEnv+"="+strings.Join(roles, ","))
	cmd.ExtraFiles = files
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, nil, err
	}
	u.log.Info("upgrade: new process started; this one serves until it is ready", "pid", cmd.Process.Pid, "binary", u.path,
		"listening_sockets", passed)
	theirs.Close() // its end only: EOF then says that it exited
	if err = awaitReady(ctx, cmd, ready); err != nil {
		return cmd.Process.Pid, nil, err
	}
	// This side writes the new pid, once the new process serves: written
	// by the new process before it said so, the pidfile would name it
	// for a moment even if it failed then.
	if u.pidfile != nil {
		if err := writePidOf(u.pidfile, cmd.Process.Pid); err != nil {
			u.log.Warn("upgrade: cannot write the new process's pid into the pidfile", "error", err)
		}
	}
	// And names it systemd's main process: from here on nothing stops it
	// (named by itself, a timeout just then would stop the process
	// systemd took for the service's).
	if u.notify != nil {
		if err := u.notify.handOverMain(cmd.Process.Pid, "serving (upgraded)"); err != nil {
			u.log.Warn("cannot notify systemd", "error", err)
		}
	}
	ready.SetReadDeadline(time.Time{})
	return cmd.Process.Pid, ready, nil
}

// upgradeSocketPair is the socket to the new process (ours, on the
// netpoller) and its end, to pass.
func upgradeSocketPair() (ours *net.UnixConn, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	f := os.NewFile(uintptr(fds[0]), "upgrade")
	c, err := net.FileConn(f) // a duplicate
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "upgrade"), nil
}

// awaitReady waits for the new process to say it is ready, to exit, for
// upgradeTimeout or for ctx to end, and stops it unless it serves.
func awaitReady(ctx context.Context, cmd *exec.Cmd, ready *net.UnixConn) error {
	deadline := time.Now().Add(upgradeTimeout)
	ready.SetReadDeadline(deadline)
	stopRead := context.AfterFunc(ctx, func() { ready.SetReadDeadline(time.Now()) })
	defer stopRead()
	var b [1]byte
	_, err := ready.Read(b[:])
	if err == nil {
		return nil
	}
	pid := cmd.Process.Pid
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// It may have taken clients from the shared sockets: SIGTERM
		// lets it finish them. Its exit is awaited in the background, so
		// that a new SIGUSR2 need not wait for its drain.
		cmd.Process.Signal(syscall.SIGTERM)
		go cmd.Wait()
		if ctx.Err() != nil {
			return fmt.Errorf("stopped the new process (pid %d): this one stops", pid)
		}
		return fmt.Errorf("the new process (pid %d) was not ready within %s; stopped it", pid, upgradeTimeout)
	}
	// EOF: it closed the pipe without a word, which it does by exiting.
	// One that closed it and runs on (a wrapper, a binary that closes
	// what it inherits) is waited for no longer than a silent one: the
	// upgrade holds the reload lock, which a stop waits for.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	timeout := time.NewTimer(time.Until(deadline))
	defer timeout.Stop()
	var werr error
	select {
	case werr = <-exited:
	case <-timeout.C:
		cmd.Process.Signal(syscall.SIGTERM)
		return fmt.Errorf("the new process (pid %d) closed its readiness pipe and did not exit within %s; stopped it", pid, upgradeTimeout)
	case <-ctx.Done():
		cmd.Process.Signal(syscall.SIGTERM)
		return fmt.Errorf("stopped the new process (pid %d): this one stops", pid)
	}
	if werr != nil {
		return fmt.Errorf("the new process (pid %d) failed: %v (its log above says why)", pid, werr)
	}
	if err != io.EOF {
		return fmt.Errorf("the new process (pid %d): reading its readiness: %w", pid, err)
	}
	return fmt.Errorf("the new process (pid %d) exited before it was ready", pid)
}

func withoutEnv(env []string, name string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, name+"=") {
			out = append(out, kv)
		}
	}
	return out
}
