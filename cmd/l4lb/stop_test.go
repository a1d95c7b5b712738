package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// tcpEcho is a TCP backend that writes back what it reads.
func tcpEcho(t *testing.T) string {
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
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// udpEcho is a UDP backend that sends back each datagram.
func udpEcho(t *testing.T) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			c.WriteToUDP(buf[:n], from)
		}
	}()
	return c.LocalAddr().String()
}

// echoes sends msg on c and reads it back.
func echoes(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo of %q: %q, %v", msg, buf, err)
	}
}

// The "stopping now" line of a second signal counts every connection the
// exit closes: clients still sending their PROXY header, connections of a
// service a reload removed that still drain, and UDP flows, not only the
// connections of running services to their backends. And it counts them
// while a reload waits for a new service's first checks, which holds the
// server's lock: a second signal must not wait for that reload.
func TestOpenConnectionsCountsWhatAStopCloses(t *testing.T) {
	tcpBackend, udpBackend := tcpEcho(t), udpEcho(t)
	ppListen := "127." + testNet + ".12.1:7000"
	goneListen := "127." + testNet + ".12.2:7000"
	udpListen := "127." + testNet + ".12.3:7000"
	slowListen := "127." + testNet + ".12.4:7000"
	parse := func(gone, slow string) *config.Config {
		t.Helper()
		text := fmt.Sprintf(`[admin]
listen = ""
[services.pp]
listen = %q
accept_proxy_protocol = true
trusted_proxies = ["127.0.0.1"]
drain_timeout = "5s"
[[services.pp.backends]]
address = %q
[services.udp]
listen = %q
protocol = "udp"
drain_timeout = "1s"
[[services.udp.backends]]
address = %q
`, ppListen, tcpBackend, udpListen, udpBackend) + gone + slow
		cfg, err := config.Parse([]byte(text), "l4lb.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	gone := fmt.Sprintf("[services.gone]\nlisten = %q\ndrain_timeout = \"5s\"\n[[services.gone.backends]]\naddress = %q\n", goneListen, tcpBackend)
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown) // after the clients close, so that it does not wait for them
	if _, err := srv.Apply(context.Background(), parse(gone, "")); err != nil {
		t.Fatal(err)
	}
	dial := func(network, addr string) net.Conn {
		t.Helper()
		c, err := net.Dial(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	proxied := dial("tcp", ppListen)
	proxied.Write([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"))
	echoes(t, proxied, "proxied")
	partial := dial("tcp", ppListen)
	partial.Write([]byte("PROXY TCP4 192.0.2.3 ")) // the rest never comes
	draining := dial("tcp", goneListen)
	echoes(t, draining, "before the reload")
	echoes(t, dial("udp", udpListen), "a flow")
	if _, err := srv.Apply(context.Background(), parse("", "")); err != nil {
		t.Fatal(err)
	}
	echoes(t, draining, "while its service drains")

	const want = 4 // proxied, partial, draining and the flow
	count := func() int64 {
		t.Helper()
		got := make(chan int64, 1)
		go func() { got <- openConnections(srv) }()
		select {
		case n := <-got:
			return n
		case <-time.After(time.Second):
			t.Fatal("counting the open connections waited over a second")
			return 0
		}
	}
	var n int64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if n = count(); n == want {
			break
		}
	}
	if n != want {
		t.Fatalf("openConnections = %d, want %d: a PROXY header in progress, a removed service's drain and a UDP flow count too", n, want)
	}

	// A reload adding a service whose backend never answers its check
	// holds the server's lock for up to 2 s while it waits for the first
	// verdict; the count does not wait for it.
	silent, probed := silentBackend(t)
	slow := fmt.Sprintf(`[services.slow]
listen = %q
[services.slow.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "2s"
timeout = "2s"
[[services.slow.backends]]
address = %q
`, slowListen, silent)
	applied := make(chan error, 1)
	go func() {
		_, err := srv.Apply(context.Background(), parse("", slow))
		applied <- err
	}()
	select {
	case <-probed: // the reload has published the service and waits
	case <-time.After(5 * time.Second):
		t.Fatal("the new service's backend was never probed")
	}
	began := time.Now()
	if n := count(); n != want {
		t.Errorf("during a reload: openConnections = %d, want %d", n, want)
	}
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(began); waited < 500*time.Millisecond {
		t.Logf("the reload ended %v after the count; it did not hold the lock long enough to tell", waited)
	}
}

// notifySocket stands in for systemd: it sets $NOTIFY_SOCKET for the
// l4lb processes the test starts, and returns what they have sent so far,
// one message each.
func notifySocket(t *testing.T) (messages func() []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	var mu sync.Mutex
	var got []string
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			got = append(got, strings.TrimSpace(string(buf[:n])))
			mu.Unlock()
		}
	}()
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}
}

// A stop that begins while a reload waits for a new service's first
// checks ends that wait: the new service does not start after "stopping",
// and systemd hears no READY=1 after STOPPING=1 (the reload's own READY=1
// once it ends), which would tell it the service runs again.
func TestStopDuringAReload(t *testing.T) {
	messages := notifySocket(t)
	backend := tcpEcho(t)
	silent, probed := silentBackend(t)
	path, _ := stopConfig(t, backend, "", "5s")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)

	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	two := fmt.Sprintf(`[services.two]
listen = "127.0.0.1:%d"
[services.two.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "2s"
timeout = "2s"
[[services.two.backends]]
address = %q
`, testPort(t), silent)
	if err := os.WriteFile(path, append(text, two...), 0o644); err != nil {
		t.Fatal(err)
	}
	run.cmd.Process.Signal(syscall.SIGHUP)
	select {
	case <-probed: // the reload waits for the check's answer, up to 2 s
	case <-time.After(10 * time.Second):
		t.Fatal("the reload's new service never probed its backend")
	}
	run.cmd.Process.Signal(syscall.SIGTERM)
	if err := run.waitExit(t, 10*time.Second); err != nil {
		t.Errorf("l4lb ended with %v, want exit 0", err)
	}
	if log := run.log(); strings.Contains(log, "service started: service=two") ||
		!strings.Contains(log, "service not started: stopping: service=two") {
		t.Error("the reload started its new service after the stop began, or did not say it dropped it")
	}
	msgs := messages()
	stopping := slices.IndexFunc(msgs, func(m string) bool { return strings.HasPrefix(m, "STOPPING=1") })
	if stopping < 0 {
		t.Fatalf("no STOPPING=1 among %q", msgs)
	}
	for _, m := range msgs[stopping+1:] {
		if strings.Contains(m, "READY=1") || strings.Contains(m, "RELOADING=1") {
			t.Errorf("systemd was sent %q after STOPPING=1 (all: %q)", m, msgs)
		}
	}
}

// A stop signal that arrives while l4lb starts, waiting for its first
// health checks, ends that wait: l4lb stops and exits 0 without saying it
// is ready (no READY=1 to systemd), and leaves nothing listening.
func TestStopWhileStarting(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT} {
		t.Run(sig.String(), func(t *testing.T) {
			messages := notifySocket(t)
			silent, probed := silentBackend(t)
			admin := fmt.Sprintf("127.0.0.1:%d", testPort(t))
			path, listen := awaitedCheckConfig(t, admin, silent)
			run := startRun(t, "-config", path)
			awaitProbe(t, probed) // l4lb waits for the probe's answer, up to 2 s
			run.cmd.Process.Signal(sig)
			if err := run.waitExit(t, 10*time.Second); err != nil {
				t.Errorf("l4lb ended with %v, want exit 0", err)
			}
			log := run.log()
			if strings.Contains(log, "l4lb: ready") || strings.Contains(log, "service started: service=demo") ||
				!strings.Contains(log, "service not started: stopping: service=demo") || !strings.Contains(log, "l4lb: stopped") {
				t.Error("l4lb finished starting after the stop signal, or did not say it stopped")
			}
			for _, m := range messages() {
				if strings.Contains(m, "READY=1") {
					t.Errorf("systemd was sent %q: l4lb said it was ready after the stop signal (all: %q)", m, messages())
				}
			}
			refuses(t, listen, "the service l4lb was starting")
			refuses(t, admin, "l4lb's admin endpoint")
		})
	}
}

// A SIGHUP while l4lb starts, waiting for its first health checks, does
// not end that wait: it reloads once l4lb is ready.
func TestReloadSignalledWhileStarting(t *testing.T) {
	silent, probed := silentBackend(t)
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	listen := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	write := func(weight int) {
		t.Helper()
		text := fmt.Sprintf(`[admin]
listen = ""
[services.demo]
listen = %q
[services.demo.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "1s"
timeout = "1s"
[[services.demo.backends]]
address = %q
weight = %d
`, listen, silent, weight)
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(100)
	run := startRun(t, "-config", path)
	select {
	case <-probed:
	case <-time.After(10 * time.Second):
		t.Fatal("no health probe reached the backend")
	}
	write(50)
	run.cmd.Process.Signal(syscall.SIGHUP)
	run.waitLog(t, "service started: service=demo", 10*time.Second)
	run.waitLog(t, "l4lb: ready:", 5*time.Second)
	if line := run.waitLog(t, "reloaded:", 5*time.Second); !strings.Contains(line, "trigger=SIGHUP") || !strings.Contains(line, "weight 100→50") {
		t.Errorf("the reload says %q; want the SIGHUP's, with the weight change", line)
	}
}

// awaitedCheckConfig writes a config with the admin endpoint on admin
// (off with "") and one service, on a port of its own, whose health
// check of backend waits up to 2 s for an answer: with a backend that
// never answers, l4lb waits that long at start for the first check.
func awaitedCheckConfig(t *testing.T, admin, backend string) (path, listen string) {
	t.Helper()
	listen = fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path = filepath.Join(t.TempDir(), "l4lb.toml")
	text := fmt.Sprintf(`[admin]
listen = %q
[services.demo]
listen = %q
[services.demo.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "2s"
timeout = "2s"
[[services.demo.backends]]
address = %q
`, admin, listen, backend)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, listen
}

// awaitProbe waits for the first health probe to reach a silentBackend.
func awaitProbe(t *testing.T, probed <-chan net.Conn) {
	t.Helper()
	select {
	case <-probed:
	case <-time.After(10 * time.Second):
		t.Fatal("no health probe reached the backend")
	}
}
