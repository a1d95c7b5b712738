package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// run -log-level overrides [log] level on every reload too: a reload
// whose file changes the level keeps the flag's, and its summary does not
// claim a change that did not happen.
func TestReloadKeepsLogLevelFlag(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	write := func(level string) {
		t.Helper()
		// An address of this test's own in 127/8: no other test holds it.
		text := "[admin]\nlisten = \"\"\n[log]\nlevel = \"" + level + "\"\n" +
			"[services.db]\nlisten = \"127." + testNet + ".11.1:7000\"\n[[services.db.backends]]\naddress = \"127.0.0.1:5432\"\n"
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	rl := &reloader{path: path, srv: srv, log: hclog.NewNullLogger(), notify: newNotifier(), logLevel: "debug"}
	write("info")
	if _, _, err := rl.apply(context.Background()); err != nil {
		t.Fatal(err)
	}
	write("warn")
	change, cfg, err := rl.apply(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log.Level != "debug" {
		t.Errorf("after a reload the level is %q, want the flag's %q", cfg.Log.Level, "debug")
	}
	if strings.Contains(change.Summary, "log.level") {
		t.Errorf("summary %q names a log.level change the flag overrides", change.Summary)
	}
}

// A taken admin address suggests another l4lb only at start; on a reload
// the new address was taken by some other program.
func TestAdminAddressTakenHint(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	a := newAdmin(hclog.NewNullLogger(), srv, &reloader{})
	const hint = "is another l4lb running"
	if _, err := a.prepare(taken.Addr().String()); err == nil || !strings.Contains(err.Error(), hint) {
		t.Errorf("at start: %v; want the hint %q", err, hint)
	}
	a.commit("", nil) // started, with the endpoint off
	if _, err := a.prepare(taken.Addr().String()); err == nil || strings.Contains(err.Error(), hint) {
		t.Errorf("on a reload: %v; want an error without the hint", err)
	}
}

// Every method the admin endpoint refuses gets 405 naming the ones it
// takes: POST for /reload, GET (and HEAD) elsewhere.
func TestAdminRefusedMethods(t *testing.T) {
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	ts := httptest.NewServer(newAdmin(hclog.NewNullLogger(), srv, &reloader{}).handler)
	t.Cleanup(ts.Close)
	for _, c := range []struct {
		method, path string
		code         int
		allow        string
	}{
		{http.MethodDelete, "/reload", http.StatusMethodNotAllowed, "POST"},
		{http.MethodGet, "/reload", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPut, "/reload", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPost, "/status", http.StatusMethodNotAllowed, "GET, HEAD"},
		{http.MethodDelete, "/metrics", http.StatusMethodNotAllowed, "GET, HEAD"},
		{http.MethodGet, "/nothing", http.StatusNotFound, ""},
	} {
		req, err := http.NewRequest(c.method, ts.URL+c.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.code || resp.Header.Get("Allow") != c.allow {
			t.Errorf("%s %s: %s, Allow %q; want %d, Allow %q", c.method, c.path, resp.Status, resp.Header.Get("Allow"), c.code, c.allow)
		}
	}
}

// A reload the file watch asks for, finding the file removed or empty
// (being replaced, or created and not yet written), waits for it: one
// warning, no failed reload, the running config serving. SIGHUP on a
// missing file still fails: whoever sent it hears why. And an unchanged
// file after a watch event is not worth an info line.
func TestReloadWaitsForTheWatchedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	write := func(weight string) {
		t.Helper()
		// An address of this test's own in 127/8: no other test holds it.
		text := "[admin]\nlisten = \"\"\n[services.db]\nlisten = \"127." + testNet + ".11.2:7000\"\n" +
			"[[services.db.backends]]\naddress = \"127.0.0.1:5432\"\nweight = " + weight + "\n"
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var logs bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Info})
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	rl := &reloader{path: path, srv: srv, log: log, notify: newNotifier()}
	write("100")
	if _, _, err := rl.apply(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	reload := func(reason string) {
		t.Helper()
		rl.reload(ctx, reason)
	}

	reload(triggerFile)
	if strings.Contains(logs.String(), "unchanged") {
		t.Errorf("an unchanged file after a watch event is logged at info:\n%s", logs.String())
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	reload(triggerFile)
	reload(triggerFile)
	if n := strings.Count(logs.String(), "[WARN]  config file removed: waiting for it to be written"); n != 1 {
		t.Errorf("%d warnings for a removed file, want 1:\n%s", n, logs.String())
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	reload(triggerFile)
	if !strings.Contains(logs.String(), "[WARN]  config file empty: waiting for it to be written") {
		t.Errorf("no warning for an empty file:\n%s", logs.String())
	}
	if st := rl.stats(); st.failed != 0 {
		t.Errorf("%d failed reloads while the file was removed or empty, want 0 (last: %s)", st.failed, st.lastError)
	}
	write("50")
	reload(triggerFile)
	if version, _, _ := srv.Version(); version != 2 {
		t.Errorf("version %d once the file is back with a change, want 2:\n%s", version, logs.String())
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	reload("SIGHUP")
	if st := rl.stats(); st.failed != 1 || !strings.Contains(st.lastError, "no such file or directory") {
		t.Errorf("SIGHUP on a removed file: %d failed, last error %q; want it failed", st.failed, st.lastError)
	}
}

// A POST /reload while l4lb stops is refused with 503: not a failed
// reload (which alerts on reloads_total{result="failed"} would page for),
// and no READY=1 to systemd after STOPPING=1.
func TestAdminReloadWhileStopping(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	text := "[admin]\nlisten = \"\"\n[services.db]\nlisten = \"127." + testNet + ".11.3:7000\"\n[[services.db.backends]]\naddress = \"127.0.0.1:5432\"\n"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := l4.NewServer(hclog.NewNullLogger())
	rl := &reloader{path: path, srv: srv, log: hclog.NewNullLogger(), notify: newNotifier()}
	if _, _, err := rl.apply(context.Background()); err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(newAdmin(hclog.NewNullLogger(), srv, rl).handler)
	t.Cleanup(ts.Close)
	rl.stop()
	srv.Shutdown()
	resp, err := http.Post(ts.URL+"/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("POST /reload while stopping: %s, want 503", resp.Status)
	}
	if st := rl.stats(); st.failed != 0 {
		t.Errorf("%d failed reloads counted while stopping (%s), want 0", st.failed, st.lastError)
	}
}

// An admin endpoint on 0.0.0.0 is on IPv4 only, as a service there is:
// it is not reachable over IPv6.
func TestAdminIPv4WildcardIsIPv4Only(t *testing.T) {
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	a := newAdmin(hclog.NewNullLogger(), srv, &reloader{})
	ln, err := a.prepare("0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err != nil {
		t.Fatalf("over IPv4: %v", err)
	} else {
		c.Close()
	}
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("[::1]:%d", port), time.Second); err == nil {
		c.Close()
		t.Errorf("admin endpoint on 0.0.0.0:%d accepted a client over IPv6", port)
	}
}

// testNet is this test process's own second octet in 127/8 for the fixed
// listen addresses above: two test processes on one host (two checkouts
// tested at once) would otherwise share an SO_REUSEPORT group.
var testNet = fmt.Sprint(89 + os.Getpid()%160)

// /status marks each backup backend and says whether a service routes to
// its backups, as read from a running server: here a primary at weight 0
// (maintenance) leaves the backup serving.
func TestStatusJSONBackups(t *testing.T) {
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := free.Addr().String()
	free.Close()
	cfg, err := config.Parse([]byte(fmt.Sprintf(`[admin]
listen = ""
[services.db]
listen = %q
  [[services.db.backends]]
  address = "127.0.0.1:1"
  weight = 0
  [[services.db.backends]]
  address = "127.0.0.1:2"
  backup = true
`, listen)), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	if _, err := srv.Apply(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(newAdmin(hclog.NewNullLogger(), srv, &reloader{}).handler)
	t.Cleanup(ts.Close)
	resp, err := http.Get(ts.URL + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		Services []struct {
			RoutingToBackups *bool `json:"routing_to_backups"`
			Backends         []struct {
				Address string `json:"address"`
				Backup  *bool  `json:"backup"`
				InRoute bool   `json:"in_route"`
			} `json:"backends"`
		} `json:"services"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if len(st.Services) != 1 || len(st.Services[0].Backends) != 2 {
		t.Fatalf("status %+v; want one service with two backends", st)
	}
	s := st.Services[0]
	if s.RoutingToBackups == nil || !*s.RoutingToBackups {
		t.Errorf("routing_to_backups %v, want true", s.RoutingToBackups)
	}
	for _, b := range s.Backends {
		wantBackup := b.Address == "127.0.0.1:2"
		if b.Backup == nil || *b.Backup != wantBackup || b.InRoute != wantBackup {
			t.Errorf("backend %s: backup %v, in_route %v; want both %v", b.Address, b.Backup, b.InRoute, wantBackup)
		}
	}
}

// postReload asks the l4lb whose admin endpoint is at admin to reload,
// on a connection of its own, and returns the answer; code 0 when there
// is none. Any goroutine may call it.
func postReload(t *testing.T, admin string) (code int, res reloadResult) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+admin+"/reload", nil)
	if err != nil {
		t.Error(err)
		return 0, res
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("POST /reload to %s: %v", admin, err)
		return 0, res
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		t.Errorf("POST /reload to %s: %s, %v", admin, resp.Status, err)
		return 0, res
	}
	return resp.StatusCode, res
}

// adminStatus is the /status document of the admin endpoint at admin.
func adminStatus(t *testing.T, admin string) statusJSON {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+admin+"/status", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /status from %s: %v", admin, err)
	}
	defer resp.Body.Close()
	var st statusJSON
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("GET /status from %s: %s, %v", admin, resp.Status, err)
	}
	return st
}

// refuses fails the test unless nothing accepts connections at addr.
func refuses(t *testing.T, addr, why string) {
	t.Helper()
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Errorf("%s accepts a connection: %s", addr, why)
	}
}

// moveAdmin sets admin.listen in a file stopConfig wrote, and extra as
// the services after its own (replacing those of an earlier call).
func moveAdmin(t *testing.T, path, admin, extra string) {
	t.Helper()
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(text), "\n", 3)
	if len(lines) < 3 || lines[0] != "[admin]" || !strings.HasPrefix(lines[1], "listen = ") {
		t.Fatalf("%s does not begin with [admin] listen:\n%s", path, text)
	}
	own, _, _ := strings.Cut(lines[2], "\n[services.")
	text = fmt.Appendf(nil, "[admin]\nlisten = %q\n%s\n%s", admin, own, extra)
	if err := os.WriteFile(path, text, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A reload moves the admin endpoint onto an address that overlaps its
// current one on the same port (127.0.0.1:P to 0.0.0.0:P, to [::]:P, and
// back), which its own socket would otherwise block. When another program
// holds the port, or the rest of the reload fails, the whole reload is
// rejected and the old endpoint keeps serving.
func TestReloadMovesAdminOntoAnOverlappingAddress(t *testing.T) {
	port := testPort(t)
	at := func(host string) string { return net.JoinHostPort(host, fmt.Sprint(port)) }
	loopback := at("127.0.0.1")
	path, _ := stopConfig(t, tcpEcho(t), loopback, "1s")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)

	for _, move := range []struct {
		to string
		// reachedAt answers only if the endpoint is on to; refusedAt only
		// if it is still on the address before.
		reachedAt, refusedAt string
	}{
		{to: at("0.0.0.0"), reachedAt: at("127.0.0.2")},
		{to: at("::"), reachedAt: at("::1")},
		{to: loopback, refusedAt: at("::1")},
	} {
		moveAdmin(t, path, move.to, "")
		if code, res := postReload(t, loopback); code != http.StatusOK || res.Error != "" {
			t.Fatalf("reload moving admin.listen to %s: %d %q, want it applied", move.to, code, res.Error)
		}
		if move.reachedAt != "" {
			adminStatus(t, move.reachedAt)
		}
		if move.refusedAt != "" {
			refuses(t, move.refusedAt, "the endpoint left it")
		}
	}

	// Another program on 127.0.0.2:P: 0.0.0.0:P cannot be had.
	other, err := net.Listen("tcp", at("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	moveAdmin(t, path, at("0.0.0.0"), "")
	code, res := postReload(t, loopback)
	other.Close()
	if code != http.StatusUnprocessableEntity || !strings.Contains(res.Error, "admin.listen") ||
		!strings.Contains(res.Error, "address already in use") {
		t.Errorf("a move onto a port another program holds: %d %q; want it rejected with the bind error", code, res.Error)
	}
	if st := adminStatus(t, loopback); st.Version != 4 {
		t.Errorf("config version %d after the rejected move, want 4", st.Version)
	}

	// The new socket binds, but a new service cannot: the whole reload
	// is rejected, and the endpoint stays where it was.
	held, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", testPort(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	unbindable := fmt.Sprintf("[services.taken]\nlisten = %q\n[[services.taken.backends]]\naddress = \"127.0.0.1:5432\"\n", held.Addr())
	moveAdmin(t, path, at("0.0.0.0"), unbindable)
	if code, res := postReload(t, loopback); code != http.StatusUnprocessableEntity || !strings.Contains(res.Error, held.Addr().String()) {
		t.Errorf("a move with a service that cannot bind: %d %q; want it rejected for the service", code, res.Error)
	}
	if st := adminStatus(t, loopback); st.Version != 4 {
		t.Errorf("config version %d after the rejected reload, want 4", st.Version)
	}
	refuses(t, at("127.0.0.2"), "the rejected reload left its new admin socket open")

	moveAdmin(t, path, at("0.0.0.0"), "")
	if code, res := postReload(t, loopback); code != http.StatusOK || res.Error != "" {
		t.Fatalf("the move once the port is free: %d %q, want it applied", code, res.Error)
	}
	adminStatus(t, at("127.0.0.2"))
}

// A POST /reload that moves the admin endpoint arrives on the endpoint
// it moves: it is answered at once, not once the old server's shutdown
// gives up waiting for it. Another request the old endpoint is handling
// meanwhile, here a second POST /reload waiting for the first, is
// answered too.
func TestReloadMovingAdminAnswersAtOnce(t *testing.T) {
	first := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	second := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	third := fmt.Sprintf("127.0.0.1:%d", testPort(t))
	path, _ := stopConfig(t, tcpEcho(t), first, "1s")
	run := startRun(t, "-config", path)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)

	moveAdmin(t, path, second, "")
	began := time.Now()
	code, res := postReload(t, first)
	// Before the fix the old server's shutdown waited for this very
	// request for its 2 s, then gave up; nothing else told the two apart,
	// so the bound is on time, with room for a slow host.
	if waited := time.Since(began); waited > time.Second {
		t.Errorf("the answer to the POST /reload that moved the endpoint took %v", waited)
	}
	if code != http.StatusOK || res.Error != "" {
		t.Fatalf("reload moving admin.listen: %d %q, want it applied", code, res.Error)
	}
	adminStatus(t, second)
	refuses(t, first, "the endpoint moved away from it")

	// A new service whose backend never answers its check holds the
	// reload for the check's timeout: the second POST /reload is then
	// handled by the old endpoint while the first one moves it.
	silent, probed := silentBackend(t)
	slow := fmt.Sprintf(`[services.slow]
listen = "127.0.0.1:%d"
[services.slow.health]
kind = "send_expect"
send = "PING\r\n"
expect = "+PONG"
interval = "1s"
timeout = "1s"
[[services.slow.backends]]
address = %q
`, testPort(t), silent)
	moveAdmin(t, path, third, slow)
	type answer struct {
		code int
		res  reloadResult
	}
	moving, waiting := make(chan answer, 1), make(chan answer, 1)
	go func() {
		code, res := postReload(t, second)
		moving <- answer{code, res}
	}()
	select {
	case <-probed:
	case <-time.After(10 * time.Second):
		t.Fatal("the reload's new service never probed its backend")
	}
	go func() {
		code, res := postReload(t, second)
		waiting <- answer{code, res}
	}()
	if a := <-moving; a.code != http.StatusOK || a.res.Error != "" || a.res.Version != 3 {
		t.Errorf("reload moving admin.listen again: %d %+v, want version 3 applied", a.code, a.res)
	}
	if a := <-waiting; a.code != http.StatusOK || a.res.Error != "" || a.res.OldVersion != 3 || a.res.Version != 3 {
		t.Errorf("the reload that waited on the old endpoint: %d %+v, want version 3 unchanged", a.code, a.res)
	}
	adminStatus(t, third)
}

// With process.user, the admin endpoint still moves onto an overlapping
// address: its socket, bound as root, pauses for one the user binds (a
// service's SO_REUSEPORT socket cannot do so: README, Privileges).
func TestReloadMovesAdminOntoAnOverlappingAddressUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (make test runs as root), to drop it")
	}
	member, _ := supplementaryMember(t)
	port := testPort(t)
	at := func(host string) string { return net.JoinHostPort(host, fmt.Sprint(port)) }
	path, _ := stopConfig(t, tcpEcho(t), at("127.0.0.1"), "1s")
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprintf(f, "[process]\nuser = %q\n", member)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	// Reloads read the file as the user: the test's directory and the one
	// testing made for it are root's only.
	for _, dir := range []string{filepath.Dir(path), filepath.Dir(filepath.Dir(path))} {
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := startRun(t, "-config", path)
	run.waitLog(t, "running unprivileged", 10*time.Second)
	run.waitLog(t, "l4lb: ready:", 10*time.Second)
	moveAdmin(t, path, at("0.0.0.0"), "")
	if code, res := postReload(t, at("127.0.0.1")); code != http.StatusOK || res.Error != "" {
		t.Fatalf("reload moving admin.listen to 0.0.0.0: %d %q, want it applied", code, res.Error)
	}
	adminStatus(t, at("127.0.0.2"))
}

// An upgrade holds reloads off while it runs (a service a reload added
// would be bound by the old process alone), lets them run again after it
// failed, and has them refused, saying why, once it succeeded.
func TestReloadsWaitForAnUpgrade(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	text := "[admin]\nlisten = \"\"\n[services.db]\nlisten = \"127." + testNet + ".11.2:7000\"\n[[services.db.backends]]\naddress = \"127.0.0.1:5432\"\n"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := l4.NewServer(hclog.NewNullLogger())
	t.Cleanup(srv.Shutdown)
	rl := &reloader{path: path, srv: srv, log: hclog.NewNullLogger(), notify: newNotifier()}

	reloaded := make(chan error, 1)
	err := rl.handOver(func() error {
		go func() {
			_, err := rl.reload(context.Background(), "SIGHUP")
			reloaded <- err
		}()
		select {
		case err := <-reloaded:
			t.Errorf("a reload ran during the upgrade (%v)", err)
		case <-time.After(200 * time.Millisecond):
		}
		return errors.New("the new process failed")
	})
	if err == nil || err.Error() != "the new process failed" {
		t.Fatalf("handOver returned %v, want the upgrade's error", err)
	}
	if err := <-reloaded; err != nil {
		t.Fatalf("the reload held off by a failed upgrade: %v", err)
	}
	if v, _, _ := srv.Version(); v != 1 {
		t.Fatalf("version %d after the reload that waited, want 1", v)
	}

	if err := rl.handOver(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := rl.reload(context.Background(), "SIGHUP"); !errors.Is(err, errUpgraded) {
		t.Errorf("a reload after a successful upgrade: %v, want %v", err, errUpgraded)
	}
}
