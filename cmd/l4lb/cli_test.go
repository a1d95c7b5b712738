package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The subcommands' arguments: -h is not an error, check takes the file as
// its argument too, and an argument nothing takes is refused instead of
// ignored.
func TestSubcommandArguments(t *testing.T) {
	good := filepath.Join(t.TempDir(), "l4lb.toml")
	if err := os.WriteFile(good, []byte("[services.db]\nlisten = \"127.0.0.1:5432\"\n[[services.db.backends]]\naddress = \"10.0.0.1:5432\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	nobody := filepath.Join(t.TempDir(), "user.toml")
	if err := os.WriteFile(nobody, []byte("[process]\nuser = \"no-such-user-l4lb\"\n[services.db]\nlisten = \"127.0.0.1:5432\"\n[[services.db.backends]]\naddress = \"10.0.0.1:5432\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	badFailback := filepath.Join(t.TempDir(), "failback.toml")
	if err := os.WriteFile(badFailback, []byte("[services.db]\nlisten = \"127.0.0.1:5432\"\non_failback = \"always\"\n[[services.db.backends]]\naddress = \"10.0.0.1:5432\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args     []string
		code     int
		inOutput string
	}{
		{[]string{"check", good}, 0, "ok (1 services)"},
		{[]string{"check", badFailback}, 1, `services.db.on_failback: "always" is not one of keep, close`},
		{[]string{"check", "-config", good}, 0, "ok (1 services)"},
		{[]string{"check", "-config", good, good}, 2, "give the file once"},
		{[]string{"check", good, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"check", "-h"}, 0, "-config"},
		{[]string{"run", "-config", good, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"run", "-h"}, 0, "-pidfile file"},
		{[]string{"status", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"reload", "-admin", "127.0.0.1:1", "-pidfile", "/nonexistent"}, 2, "not both"},
		{[]string{"version"}, 0, "l4lb "},
		{[]string{"check", nobody}, 0, `warning: process.user "no-such-user-l4lb": no such user on this host`},
		{[]string{"run", "-config", nobody}, 1, `process.user "no-such-user-l4lb": no such user on this host`},
	} {
		var out bytes.Buffer
		code := runMain(c.args, &out, &out)
		if code != c.code || !strings.Contains(out.String(), c.inOutput) {
			t.Errorf("l4lb %s: exit %d, output %q; want exit %d and %q", strings.Join(c.args, " "), code, out.String(), c.code, c.inOutput)
		}
	}
}

// runProc is this test binary running as `l4lb run` (see TestMain), with
// its log read line by line.
type runProc struct {
	cmd *exec.Cmd
	// exited is closed once the process has exited; err is then its end.
	exited chan struct{}
	err    error

	mu    sync.Mutex // guards lines and more
	lines []string
	// more is closed, and replaced, when a line arrives.
	more chan struct{}
}

// startRun starts `l4lb run` with args, in a process of its own so that
// its signals and exit are real. It is killed at the end of the test.
func startRun(t *testing.T, args ...string) *runProc {
	t.Helper()
	return startRunBinary(t, os.Args[0], args...)
}

// startRunBinary is startRun with bin, a copy of the test binary.
func startRunBinary(t *testing.T, bin string, args ...string) *runProc {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "L4LB_TEST_RUN="+strings.Join(append([]string{"run"}, args...), "\n"))
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &runProc{cmd: cmd, exited: make(chan struct{}), more: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("l4lb's log:\n%s", p.log())
		}
	})
	return p
}

func (p *runProc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// waitLog waits for a log line containing text, and returns it.
func (p *runProc) waitLog(t *testing.T, text string, within time.Duration) string {
	t.Helper()
	deadline := time.After(within)
	for seen := 0; ; {
		p.mu.Lock()
		lines, more := p.lines, p.more
		p.mu.Unlock()
		for ; seen < len(lines); seen++ {
			if strings.Contains(lines[seen], text) {
				return lines[seen]
			}
		}
		select {
		case <-more:
		case <-p.exited:
			// The last lines may have come with the exit.
			p.mu.Lock()
			done := seen == len(p.lines)
			p.mu.Unlock()
			if done {
				t.Fatalf("l4lb exited (%v) without logging %q", p.err, text)
			}
		case <-deadline:
			t.Fatalf("no %q in l4lb's log within %s", text, within)
		}
	}
}

// testPort is a port for a service of a test, in 30000-39999 (the range
// the tests here bind listen addresses in) and free when it is picked.
func testPort(t *testing.T) int {
	t.Helper()
	for range 100 {
		port := 30000 + rand.IntN(10000)
		if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			ln.Close()
			return port
		}
	}
	t.Fatal("no free port in 30000-39999")
	return 0
}

// silentBackend accepts connections, holds them and never writes: a health
// check that expects a reply waits for its timeout. accepted gets each
// connection; all are closed at the end of the test.
func silentBackend(t *testing.T) (addr string, accepted <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan net.Conn, 64)
	var held []net.Conn
	var mu sync.Mutex // guards held
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			select {
			case conns <- c:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String(), conns
}

// A change to the config file made while l4lb starts, here while it
// waits for its first health checks, is applied once it is ready: the
// file is watched before it is read.
func TestRunAppliesAChangeMadeWhileStarting(t *testing.T) {
	backend, probes := silentBackend(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "l4lb.toml")
	port := testPort(t)
	write := func(weight int) {
		t.Helper()
		text := fmt.Sprintf(`[admin]
listen = ""
[reload]
watch = true
[services.demo]
listen = "127.0.0.1:%d"
[services.demo.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "1s"
timeout = "1s"
[[services.demo.backends]]
address = %q
weight = %d
`, port, backend, weight)
		// Renamed into place, as deploy tools do.
		tmp := filepath.Join(dir, ".l4lb.toml.tmp")
		if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write(100)
	run := startRun(t, "-config", path)
	// The first probe: l4lb has read the file and waits for the probe's
	// answer (up to its 1 s timeout) before it is ready.
	select {
	case <-probes:
	case <-time.After(10 * time.Second):
		t.Fatal("no health probe reached the backend")
	}
	write(50)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	line := run.waitLog(t, "reloaded:", 5*time.Second)
	if !strings.Contains(line, "weight 100→50") {
		t.Errorf("the reload says %q; want the weight change", line)
	}
}

// waitExit waits for the process to exit and returns how it ended.
func (p *runProc) waitExit(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(within):
		t.Fatalf("l4lb still runs %s later", within)
		return nil
	}
}

// stopConfig writes a config with one service, demo, in front of backend,
// with no health checks (so that it routes at once) and drain_timeout.
func stopConfig(t *testing.T, backend, adminAddr, drain string) (path string, listen string) {
	t.Helper()
	listen = fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path = filepath.Join(t.TempDir(), "l4lb.toml")
	text := fmt.Sprintf("[admin]\nlisten = %q\n[services.demo]\nlisten = %q\ndrain_timeout = %q\n[[services.demo.backends]]\naddress = %q\n",
		adminAddr, listen, drain, backend)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, listen
}

// While l4lb drains before it exits, /status still shows the services, as
// draining; a second SIGTERM (or SIGINT) stops it at once, closing the
// connections the first one would have waited for.
func TestRunStopsAtOnceOnASecondSignal(t *testing.T) {
	backend, accepted := silentBackend(t)
	adminAddr := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path, listen := stopConfig(t, backend, adminAddr, "1m")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	client := dialThrough(t, listen, accepted)
	defer client.Close()

	run.cmd.Process.Signal(syscall.SIGTERM)
	run.waitLog(t, "draining before exit: service=demo connections=1", 5*time.Second)
	if st := adminStatus(t, adminAddr); !st.Stopping || len(st.Services) != 1 || st.Services[0].Name != "demo" || !st.Services[0].Draining ||
		len(st.Services[0].Backends) != 1 || st.Services[0].Backends[0].Active != 1 {
		t.Errorf("/status while draining: %+v; want stopping, and demo draining with its connection", st)
	}

	run.cmd.Process.Signal(syscall.SIGTERM)
	if err := run.waitExit(t, 5*time.Second); err != nil {
		t.Errorf("l4lb ended with %v after a second SIGTERM, want exit 0", err)
	}
	if line := run.waitLog(t, "stopping now: closing every open connection", time.Second); !strings.Contains(line, "connections=1") {
		t.Errorf("the log says %q; want it to count the connection it closes", line)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("the client's connection is still open after l4lb exited")
	}
}

// SIGQUIT stops l4lb as SIGTERM does (as it stops nginx gracefully),
// rather than dumping goroutines and exiting at once with status 2.
func TestRunStopsGracefullyOnSIGQUIT(t *testing.T) {
	backend, _ := silentBackend(t)
	path, _ := stopConfig(t, backend, "", "5s")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	run.cmd.Process.Signal(syscall.SIGQUIT)
	if err := run.waitExit(t, 10*time.Second); err != nil {
		t.Errorf("l4lb ended with %v after SIGQUIT, want exit 0", err)
	}
	run.waitLog(t, "stopping: no new connections; open ones may finish within drain_timeout: signal=quit", time.Second)
	run.waitLog(t, "l4lb: stopped", time.Second)
}

// At start l4lb says whether its UDP services send runs of datagrams as one
// segmented send: yes, unless L4LB_UDP_GSO=off; a config without a UDP
// service says nothing of it.
func TestRunSaysWhetherUDPSegments(t *testing.T) {
	for _, tc := range []struct {
		name, gso, protocol, health, want string
	}{
		{"udp", "", "udp", "\n[services.demo.health]\nkind = \"none\"", "as one segmented send (UDP GSO)"},
		{"udp, L4LB_UDP_GSO=off", "off", "udp", "\n[services.demo.health]\nkind = \"none\"", "no segmentation: reason=L4LB_UDP_GSO=off"},
		{"tcp only", "", "tcp", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("L4LB_UDP_GSO", tc.gso)
			path := filepath.Join(t.TempDir(), "l4lb.toml")
			text := fmt.Sprintf("[admin]\nlisten = \"\"\n[services.demo]\nlisten = \"127.0.0.1:%d\"\nprotocol = %q%s\n[[services.demo.backends]]\naddress = \"127.0.0.1:9\"\n",
				testPort(t), tc.protocol, tc.health)
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			run := startRun(t, "-config", path)
			if tc.want != "" {
				run.waitLog(t, tc.want, 10*time.Second)
				return
			}
			run.waitLog(t, "l4lb: ready:", 10*time.Second)
			if strings.Contains(run.log(), "UDP datagrams") {
				t.Errorf("a config without UDP services logged of UDP segmentation:\n%s", run.log())
			}
		})
	}
}

// dialThrough connects to listen and waits until the connection reaches
// the silentBackend whose accepted it is.
func dialThrough(t *testing.T, listen string, accepted <-chan net.Conn) net.Conn {
	t.Helper()
	client, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		client.Close()
		t.Fatal("the client's connection never reached the backend")
	}
	return client
}
