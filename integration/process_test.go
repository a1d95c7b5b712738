package integration

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	// readyTimeout bounds how long a process may take to say it is ready.
	readyTimeout = 10 * time.Second
	// stopTimeout bounds a stop after SIGTERM; it is longer than any
	// drain_timeout the tests configure.
	stopTimeout = 20 * time.Second
)

// process is a program run in a network namespace through `ip netns exec`
// (which execs it, so signals sent to the pid reach the program itself),
// with its stdout and stderr collected line by line.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}    // closed once the process has exited and its output is read
	state  *os.ProcessState // set before exited is closed

	mu      sync.Mutex    // guards out and newLine
	out     []string      // "stdout: LINE" or "stderr: LINE"
	newLine chan struct{} // closed and replaced whenever a line is added

	stopOnce  sync.Once
	stopClean bool // set by the first stop: the process exited without SIGKILL
}

// startProcess runs args inside namespace ns and waits until a line of
// stream ("stdout" or "stderr") contains ready. The caller registers the
// cleanup that stops it, even on error when the process is not nil.
func startProcess(t *testing.T, ns, stream, ready string, args ...string) (*process, error) {
	t.Helper()
	p := &process{exited: make(chan struct{}), newLine: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	var readers sync.WaitGroup
	readers.Go(func() { p.collect("stdout", stdout) })
	readers.Go(func() { p.collect("stderr", stderr) })
	go func() {
		readers.Wait() // cmd.Wait closes the pipes: read them to the end first
		p.cmd.Wait()
		p.state = p.cmd.ProcessState
		close(p.exited)
	}()
	if err := p.WaitFor(stream, ready, readyTimeout); err != nil {
		return p, fmt.Errorf("%s: %w", args[0], err)
	}
	return p, nil
}

func (p *process) collect(stream string, r io.Reader) {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if line != "" {
			p.mu.Lock()
			p.out = append(p.out, stream+": "+strings.TrimSuffix(line, "\n"))
			close(p.newLine)
			p.newLine = make(chan struct{})
			p.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// WaitFor waits up to timeout for a line of stream ("stdout" or "stderr")
// that contains substr, among the lines printed so far and to come.
func (p *process) WaitFor(stream, substr string, timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	prefix := stream + ": "
	for seen, exited := 0, false; ; {
		p.mu.Lock()
		lines, newLine := p.out[seen:], p.newLine
		seen = len(p.out)
		p.mu.Unlock()
		for _, line := range lines {
			if text, ok := strings.CutPrefix(line, prefix); ok && strings.Contains(text, substr) {
				return nil
			}
		}
		if exited {
			return fmt.Errorf("exited (%v) without printing %q on %s", p.state, substr, stream)
		}
		select {
		case <-newLine:
		case <-p.exited:
			exited = true // all output is in now: look once more
		case <-timer.C:
			return fmt.Errorf("no %q on %s within %v", substr, stream, timeout)
		}
	}
}

// Output is everything the process printed so far, one line per line.
func (p *process) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.out, "\n")
}

// Signal sends sig to the process.
func (p *process) Signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// Exited reports whether the process has exited.
func (p *process) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// WaitExit waits up to timeout for the process to exit and returns its
// state, or nil on timeout.
func (p *process) WaitExit(timeout time.Duration) *os.ProcessState {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.exited:
		return p.state
	case <-timer.C:
		return nil
	}
}

// stop sends SIGTERM unless the process has exited, waits up to stopTimeout
// and kills it past that. It returns the exit state and whether it exited by
// itself. Only the first call does anything; later ones return the same.
func (p *process) stop() (state *os.ProcessState, clean bool) {
	p.stopOnce.Do(func() {
		if !p.Exited() {
			p.cmd.Process.Signal(syscall.SIGTERM)
		}
		if p.WaitExit(stopTimeout) == nil {
			p.cmd.Process.Kill()
			<-p.exited
			return
		}
		p.stopClean = true
	})
	return p.state, p.stopClean
}

// lb is a running l4lb.
type lb struct {
	*process
	// Path is the config file l4lb runs from; tests rewrite it to reload.
	Path      string
	checkOnce sync.Once
}

// startLB runs `l4lb run` in namespace ns with config conf, and any extra
// flags (such as "-log-level", "debug"), and waits for its "l4lb: ready"
// line on stderr. At cleanup it stops l4lb with SIGTERM, checks that it
// exits 0, and puts its log in the test log if the test failed.
func startLB(t *testing.T, ns, conf string, flags ...string) *lb {
	t.Helper()
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{l4lbBin, "run", "-config", path}, flags...)
	p, err := startProcess(t, ns, "stderr", "l4lb: ready", args...)
	if p == nil {
		t.Fatalf("start l4lb: %v", err)
	}
	l := &lb{process: p, Path: path}
	t.Cleanup(func() {
		state, clean := l.stop()
		switch {
		case !clean:
			t.Errorf("l4lb did not exit within %v of SIGTERM; killed it", stopTimeout)
		case err == nil: // a failed start has been reported already
			l.checkExit(t, state)
		}
		if t.Failed() {
			t.Logf("l4lb config:\n%s\nl4lb output:\n%s", conf, l.Output())
		}
	})
	if err != nil {
		t.Fatalf("start l4lb: %v", err)
	}
	return l
}

// checkExit reports an error unless l4lb exited 0; it reports at most once.
func (l *lb) checkExit(t *testing.T, state *os.ProcessState) {
	t.Helper()
	l.checkOnce.Do(func() {
		if state.ExitCode() != 0 {
			t.Errorf("l4lb exited with %v, want exit status 0", state)
		}
	})
}

// startIperf3Server runs a one-off `iperf3 -s` bound to addr in namespace
// ns and waits until it listens. Cleanup kills it if it is still running.
func startIperf3Server(t *testing.T, ns, addr, port string) {
	t.Helper()
	p, err := startProcess(t, ns, "stdout", "Server listening",
		"iperf3", "-s", "-1", "--forceflush", "-B", addr, "-p", port)
	if p == nil {
		t.Fatalf("start iperf3 server: %v", err)
	}
	t.Cleanup(func() {
		if !p.Exited() {
			p.cmd.Process.Kill()
		}
		<-p.exited
		if t.Failed() {
			t.Logf("iperf3 server in %s:\n%s", ns, p.Output())
		}
	})
	if err != nil {
		t.Fatalf("start iperf3 server: %v", err)
	}
}
