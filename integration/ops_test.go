package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// adminAddr is where these tests put l4lb's admin endpoint, on the lb
// namespace's loopback.
const adminAddr = "127.0.0.1:9901"

// adminClient returns an HTTP client whose connections are made inside
// namespace ns.
func adminClient(ns string) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := inNetns(ns, func() error {
					var err error
					c, err = (&net.Dialer{Timeout: dialTimeout}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

func adminGet(t *testing.T, ns, path string) []byte {
	t.Helper()
	resp, err := adminClient(ns).Get("http://" + adminAddr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v\n%s", path, resp.Status, err, body)
	}
	return body
}

// withAdmin turns on the admin endpoint (and any other top-level lines) in
// a config from configTOML.
func withAdmin(conf string, extra ...string) string {
	return strings.Replace(conf, "[admin]\nlisten = \"\"\n",
		fmt.Sprintf("[admin]\nlisten = %q\n%s\n", adminAddr, strings.Join(extra, "\n")), 1)
}

// statusDoc is the part of GET /status these tests read.
type statusDoc struct {
	Version  uint64 `json:"version"`
	Hash     string `json:"hash"`
	Services []struct {
		Name     string `json:"name"`
		Accepted uint64 `json:"accepted"`
		Backends []struct {
			Address        string     `json:"address"`
			Weight         int        `json:"weight"`
			Health         string     `json:"health"`
			Active         int64      `json:"active"`
			Total          uint64     `json:"total"`
			BytesToBackend uint64     `json:"bytes_to_backend"`
			BytesToClient  uint64     `json:"bytes_to_client"`
			Draining       bool       `json:"draining"`
			DrainDeadline  *time.Time `json:"drain_deadline"`
			Configured     bool       `json:"configured"`
			InRoute        bool       `json:"in_route"`
			LastTransition *struct {
				From, To, Reason string
				At               time.Time
			} `json:"last_transition"`
		} `json:"backends"`
	} `json:"services"`
}

// TestStatusAndMetricsCountTraffic sends a known number of connections and
// bytes and checks that /status and /metrics report exactly those, and that
// /metrics is valid Prometheus text without duplicate series.
func TestStatusAndMetricsCountTraffic(t *testing.T) {
	const conns, size = 6, 300_000
	top := newTopology(t, 1, conns, 2)
	svc := echoService(t, top, "echo", echoPort, false, echo)
	startLB(t, top.LB, withAdmin(configTOML(svc)))

	c := top.Clients[0]
	perBackend := map[string]int{}
	for i, src := range c.Addrs4 {
		conn, err := dialFrom(c.NS, src, netip.AddrPortFrom(vip4, echoPort))
		if err != nil {
			t.Fatal(err)
		}
		name, err := echoRoundTrip(conn, size, uint64(i))
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		perBackend[top.backendByName(t, name).Addr4.String()]++
	}
	greetingLen := len("backend b1\n")

	// A connection's counters are final once l4lb has closed it: wait for
	// active to reach 0 (bounded).
	var st statusDoc
	for i := 0; ; i++ {
		if err := json.Unmarshal(adminGet(t, top.LB, "/status"), &st); err != nil {
			t.Fatal(err)
		}
		if activeSum(st) == 0 {
			break
		}
		if i == 50 {
			t.Fatalf("connections still active 5s after the clients closed: %+v", st)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st.Version != 1 || len(st.Hash) != 64 || len(st.Services) != 1 {
		t.Fatalf("status header: %+v", st)
	}
	s := st.Services[0]
	if s.Accepted != conns {
		t.Errorf("accepted = %d, want %d", s.Accepted, conns)
	}
	for _, b := range s.Backends {
		port := strconv.Itoa(echoPort)
		n := uint64(perBackend[strings.TrimSuffix(b.Address, ":"+port)])
		if b.Total != n || b.BytesToBackend != n*size || b.BytesToClient != n*(size+uint64(greetingLen)) {
			t.Errorf("backend %s: total %d, bytes to backend %d, to client %d; want %d, %d, %d",
				b.Address, b.Total, b.BytesToBackend, b.BytesToClient, n, n*size, n*(size+uint64(greetingLen)))
		}
		if b.Health != "up" || b.Weight != 100 || b.Draining {
			t.Errorf("backend %s: health %q weight %d draining %v", b.Address, b.Health, b.Weight, b.Draining)
		}
	}

	families := parseMetrics(t, adminGet(t, top.LB, "/metrics"))
	if got := metricValue(t, families, "l4lb_connections_accepted_total", map[string]string{"service": "echo"}); got != conns {
		t.Errorf("l4lb_connections_accepted_total = %v, want %d", got, conns)
	}
	var bytesToBackend float64
	for _, b := range top.Backends {
		labels := map[string]string{"service": "echo", "backend": netip.AddrPortFrom(b.Addr4, echoPort).String()}
		bytesToBackend += metricValue(t, families, "l4lb_backend_bytes_total", with(labels, "direction", "to_backend"))
		n := float64(perBackend[b.Addr4.String()])
		if got := metricValue(t, families, "l4lb_backend_connections_total", labels); got != n {
			t.Errorf("l4lb_backend_connections_total%v = %v, want %v", labels, got, n)
		}
		if h := metricHistogram(t, families, "l4lb_backend_connect_duration_seconds", labels); h.GetSampleCount() != uint64(n) {
			t.Errorf("connect duration histogram%v has %d samples, want %v", labels, h.GetSampleCount(), n)
		}
	}
	if bytesToBackend != conns*size {
		t.Errorf("l4lb_backend_bytes_total to_backend sums to %v, want %d", bytesToBackend, conns*size)
	}
	if v := metricValue(t, families, "l4lb_config_version", nil); v != 1 {
		t.Errorf("l4lb_config_version = %v", v)
	}
}

func activeSum(st statusDoc) int64 {
	var n int64
	for _, s := range st.Services {
		for _, b := range s.Backends {
			n += b.Active
		}
	}
	return n
}

func (top *topology) backendByName(t *testing.T, name string) *backendNS {
	t.Helper()
	for _, b := range top.Backends {
		if b.Name == name {
			return b
		}
	}
	t.Fatalf("no backend named %q", name)
	return nil
}

func with(labels map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for lk, lv := range labels {
		out[lk] = lv
	}
	return out
}

// parseMetrics parses Prometheus text and fails on a series that appears
// twice (same name and labels).
func parseMetrics(t *testing.T, body []byte) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("metrics do not parse: %v\n%s", err, body)
	}
	seen := map[string]bool{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := name + fmt.Sprint(labelMap(m))
			if seen[key] {
				t.Errorf("duplicate series %s", key)
			}
			seen[key] = true
		}
	}
	return families
}

func labelMap(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

func findMetric(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	f := families[name]
	if f == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range f.GetMetric() {
		got := labelMap(m)
		for k, v := range labels {
			if got[k] != v {
				continue next
			}
		}
		return m
	}
	t.Fatalf("no series %s%v", name, labels)
	return nil
}

func metricValue(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	m := findMetric(t, families, name, labels)
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	t.Fatalf("%s is neither counter nor gauge", name)
	return 0
}

func metricHistogram(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Histogram {
	t.Helper()
	m := findMetric(t, families, name, labels)
	if m.Histogram == nil {
		t.Fatalf("%s is not a histogram", name)
	}
	return m.Histogram
}

// TestAdminEndpoint checks that only GET and POST /reload are served, and
// that POST /reload reloads like SIGHUP.
func TestAdminEndpoint(t *testing.T) {
	top := newTopology(t, 1, 1, 2)
	svc := echoService(t, top, "echo", echoPort, false, echo)
	l := startLB(t, top.LB, withAdmin(configTOML(svc)))
	client := adminClient(top.LB)
	for _, method := range []string{"POST", "PUT", "DELETE", "PATCH"} {
		for _, path := range []string{"/status", "/metrics", "/"} {
			req, _ := http.NewRequest(method, "http://"+adminAddr+path, nil)
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: %s, want 405", method, path, resp.Status)
			}
		}
	}
	if resp, err := client.Get("http://" + adminAddr + "/reload"); err != nil || resp.StatusCode == http.StatusOK {
		t.Errorf("GET /reload must not reload: %v %v", resp, err)
	}

	// POST /reload with one backend removed: version 2 and the change.
	svc.Backends = svc.Backends[:1]
	if err := os.WriteFile(l.Path, []byte(withAdmin(configTOML(svc))), 0o644); err != nil {
		t.Fatal(err)
	}
	resp, err := client.Post("http://"+adminAddr+"/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		OldVersion uint64 `json:"old_version"`
		Version    uint64 `json:"version"`
		Changes    string `json:"changes"`
		Error      string `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || res.OldVersion != 1 || res.Version != 2 || !strings.Contains(res.Changes, "-") {
		t.Errorf("POST /reload: %s %+v", resp.Status, res)
	}

	// A bad file: 422, the error, and the version stays.
	if err := os.WriteFile(l.Path, []byte("[services.x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	resp, err = client.Post("http://"+adminAddr+"/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&res)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnprocessableEntity || res.Version != 2 || !strings.Contains(res.Error, "l4lb.toml:1:") {
		t.Errorf("bad POST /reload: %s %+v", resp.Status, res)
	}
	var st struct {
		Version         uint64 `json:"version"`
		ReloadsFailed   uint64 `json:"reloads_failed"`
		LastReloadError string `json:"last_reload_error"`
	}
	json.Unmarshal(adminGet(t, top.LB, "/status"), &st)
	if st.Version != 2 || st.ReloadsFailed != 1 || !strings.Contains(st.LastReloadError, "l4lb.toml:1:") {
		t.Errorf("status after a failed reload: %+v", st)
	}

	// The CLI reads the same endpoint, from inside the namespace.
	out, err := runIn(top.LB, l4lbBin, "status", "-admin", adminAddr)
	if err != nil || !strings.Contains(out, "SERVICE") || !strings.Contains(out, "echo") || !strings.Contains(out, "reloads ok 1, failed 1") {
		t.Errorf("l4lb status: %v\n%s", err, out)
	}
}

func runIn(ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

// TestConnectionLogAndJSON runs with [log] format = "json" and connections
// = true: every log line is a JSON object, and a closed connection gives
// one line with its client, backend and byte counts.
func TestConnectionLogAndJSON(t *testing.T) {
	top := newTopology(t, 1, 1, 1)
	svc := echoService(t, top, "echo", echoPort, false, echo)
	// Not startLB: it waits for the text log's ready line.
	path := filepath.Join(t.TempDir(), "l4lb.toml")
	conf := withAdmin(configTOML(svc), "[log]\nformat = \"json\"\nconnections = true")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := startProcess(t, top.LB, "stderr", `"@message":"ready"`, l4lbBin, "run", "-config", path)
	if l != nil {
		t.Cleanup(func() {
			if _, clean := l.stop(); !clean || t.Failed() {
				t.Logf("l4lb output:\n%s", l.Output())
			}
		})
	}
	if err != nil {
		t.Fatalf("start l4lb: %v", err)
	}
	c := top.Clients[0]
	conn, err := dialFrom(c.NS, c.Addrs4[0], netip.AddrPortFrom(vip4, echoPort))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := echoRoundTrip(conn, 1000, 1); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if err := l.WaitFor("stderr", "connection closed", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(l.Output(), "\n") {
		text, ok := strings.CutPrefix(line, "stderr: ")
		if !ok || text == "" {
			continue
		}
		var entry map[string]any
		if err := json.Unmarshal([]byte(text), &entry); err != nil {
			t.Errorf("log line is not JSON: %q", text)
			continue
		}
		if entry["@message"] != "connection closed" {
			continue
		}
		if entry["bytes_to_backend"] != float64(1000) || entry["bytes_to_client"] != float64(1000+len("backend b1\n")) ||
			!strings.HasPrefix(fmt.Sprint(entry["client"]), c.Addrs4[0].String()+":") || entry["service"] != "echo" {
			t.Errorf("connection log line: %v", entry)
		}
		return
	}
	t.Error("no JSON connection log line")
}

// TestSystemdNotify listens on a unixgram socket as NOTIFY_SOCKET and sees
// READY=1 at start, RELOADING=1 with MONOTONIC_USEC then READY=1 around a
// reload, and STOPPING=1 at SIGTERM.
func TestSystemdNotify(t *testing.T) {
	top := newTopology(t, 1, 1, 1)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	svc := echoService(t, top, "echo", echoPort, false, echo)
	l := startLB(t, top.LB, configTOML(svc))

	read := func(want string) string {
		t.Helper()
		buf := make([]byte, 4096)
		ln.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q: %v", want, err)
		}
		msg := string(buf[:n])
		if !strings.Contains(msg, want) {
			t.Fatalf("notify message %q, want %q", msg, want)
		}
		return msg
	}
	read("READY=1")
	l.Signal(t, syscall.SIGHUP)
	msg := read("RELOADING=1")
	if !strings.Contains(msg, "MONOTONIC_USEC=") {
		t.Errorf("RELOADING=1 without MONOTONIC_USEC: %q", msg)
	}
	read("READY=1")
	l.Signal(t, syscall.SIGTERM)
	read("STOPPING=1")
}

// TestPrivilegeDrop runs l4lb with [process] user = "nobody": every thread
// runs as nobody after start, traffic flows, a reload works, and a reload
// that needs a privileged port is rejected with the old config kept.
func TestPrivilegeDrop(t *testing.T) {
	top := newTopology(t, 1, 1, 2)
	svc := echoService(t, top, "echo", echoPort, false, echo)
	conf := withAdmin(configTOML(svc), "[process]\nuser = \"nobody\"")
	// nobody must be able to read the config to reload it.
	dir, err := os.MkdirTemp("", "l4lb-privdrop-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "l4lb.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// The pidfile goes in a directory only root may write, like /run: it
	// must be written before the drop.
	runDir := t.TempDir()
	os.Chmod(runDir, 0o755)
	pidfile := filepath.Join(runDir, "l4lb.pid")
	// Not startLB: its config sits in a private temp dir nobody cannot read.
	p, err := startProcess(t, top.LB, "stderr", "l4lb: ready", l4lbBin, "run", "-config", path, "-pidfile", pidfile)
	if err != nil {
		t.Fatalf("start l4lb: %v", err)
	}
	if b, err := os.ReadFile(pidfile); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(p.cmd.Process.Pid) {
		t.Errorf("pidfile %s: %q, %v; want the process id %d", pidfile, b, err, p.cmd.Process.Pid)
	}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("l4lb output:\n%s", p.Output())
		}
	})

	pid := p.cmd.Process.Pid
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	for _, task := range tasks {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(status), "\n") {
			if ids, ok := strings.CutPrefix(line, "Uid:"); ok {
				for _, id := range strings.Fields(ids) {
					if id == "0" {
						t.Errorf("thread %s still has uid 0: %q", task.Name(), line)
					}
				}
			}
		}
	}

	c := top.Clients[0]
	roundTripOnce := func() {
		t.Helper()
		conn, err := dialFrom(c.NS, c.Addrs4[0], netip.AddrPortFrom(vip4, echoPort))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := echoRoundTrip(conn, 10_000, 3); err != nil {
			t.Fatal(err)
		}
	}
	roundTripOnce()

	// A reload as nobody works.
	svc.Backends = svc.Backends[:1]
	if err := os.WriteFile(path, []byte(withAdmin(configTOML(svc), "[process]\nuser = \"nobody\"")), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Signal(t, syscall.SIGHUP)
	if err := p.WaitFor("stderr", "new_version=2", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	roundTripOnce()

	// Port 80 needs root, which l4lb gave up: rejected, version stays.
	priv := service{Name: "web", Listen: netip.AddrPortFrom(vip4, 80), Backends: svc.Backends}
	if err := os.WriteFile(path, []byte(withAdmin(configTOML(svc, priv), "[process]\nuser = \"nobody\"")), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Signal(t, syscall.SIGHUP)
	if err := p.WaitFor("stderr", "services.web.listen", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p.Output(), "permission denied") {
		t.Errorf("rejection does not say permission denied:\n%s", p.Output())
	}
	roundTripOnce()
}

// TestStatusShowsHealthAndDrain checks that /status and /metrics show a
// backend the checks marked down (with its transition) and a removed
// backend draining an open connection (with its deadline).
func TestStatusShowsHealthAndDrain(t *testing.T) {
	const drain = 30 * time.Second
	top := newTopology(t, 1, 1, 2)
	echoSvc := echoService(t, top, "echo", echoPort, false, echo)
	svc := checkedService{Name: "echo", Listen: echoSvc.Listen, Backends: echoSvc.Backends, Extra: "passive_fall = 0",
		Health: tcpCheck(300*time.Millisecond, 200*time.Millisecond, 1, 2)}
	render := func(s checkedService) string {
		return withAdmin(strings.Replace(healthConf(s), `drain_timeout = "2s"`, fmt.Sprintf("drain_timeout = %q", drain), 1))
	}
	l := startLB(t, top.LB, render(svc))
	waitAllUp(t, l, svc.Backends)

	// One open connection; the other backend is then blocked and goes down.
	c := top.Clients[0]
	conn, err := dialFrom(c.NS, c.Addrs4[0], svc.Listen)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(ioTimeout))
	name, err := readGreeting(bufio.NewReader(conn))
	if err != nil {
		t.Fatal(err)
	}
	held := top.backendByName(t, name)
	heldAddr := netip.AddrPortFrom(held.Addr4, echoPort)
	var other *backendNS
	for _, b := range top.Backends {
		if b != held {
			other = b
		}
	}
	otherAddr := netip.AddrPortFrom(other.Addr4, echoPort)
	mark := logMark(l.process)
	nftBlock(t, other.NS, echoPort, "reject")
	if _, _, err := waitLog(l.process, mark, 2*time.Second, transitionTo(otherAddr, "down")...); err != nil {
		t.Fatal(err)
	}
	if _, _, err := waitLog(l.process, mark, time.Second, "routing table rebuilt", "healthy=1 "); err != nil {
		t.Fatal(err)
	}

	// Remove the backend that holds the connection: it drains.
	next := svc
	next.Backends = []netip.AddrPort{otherAddr}
	reloaded := reloadTo(t, l, render(next), 2)

	var st statusDoc
	if err := json.Unmarshal(adminGet(t, top.LB, "/status"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Version != 2 || len(st.Services) != 1 {
		t.Fatalf("status: version %d, %d services", st.Version, len(st.Services))
	}
	seen := map[string]bool{}
	for _, b := range st.Services[0].Backends {
		seen[b.Address] = true
		switch b.Address {
		case otherAddr.String():
			if b.Health != "down" || b.InRoute || b.LastTransition == nil || b.LastTransition.From != "up" ||
				b.LastTransition.To != "down" || b.LastTransition.Reason == "" {
				t.Errorf("blocked backend %s: health %q in_route %v last transition %+v; want down, out of the route, up → down with a reason",
					b.Address, b.Health, b.InRoute, b.LastTransition)
			}
		case heldAddr.String():
			if !b.Draining || b.Configured || b.Active != 1 || b.DrainDeadline == nil {
				t.Fatalf("removed backend %s: draining %v configured %v active %d deadline %v; want draining, removed, 1 open, a deadline",
					b.Address, b.Draining, b.Configured, b.Active, b.DrainDeadline)
			}
			if d := b.DrainDeadline.Sub(reloaded); d < drain-2*time.Second || d > drain+2*time.Second {
				t.Errorf("drain deadline %v after the reload, want about %v", d, drain)
			}
		default:
			t.Errorf("unexpected backend %s in /status", b.Address)
		}
	}
	if len(seen) != 2 {
		t.Errorf("/status lists %v; want the blocked and the draining backend", seen)
	}

	families := parseMetrics(t, adminGet(t, top.LB, "/metrics"))
	otherLabels := map[string]string{"service": "echo", "backend": otherAddr.String()}
	heldLabels := map[string]string{"service": "echo", "backend": heldAddr.String()}
	for _, m := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"l4lb_backend_up", otherLabels, 0},
		{"l4lb_backend_health_transitions_total", with(otherLabels, "to", "down"), 1},
		{"l4lb_backend_draining", heldLabels, 1},
		{"l4lb_draining_connections", map[string]string{"service": "echo"}, 1},
	} {
		if got := metricValue(t, families, m.name, m.labels); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
}

// TestStatusAndMetricsCountUDP sends a known number of datagrams over a
// known number of flows and checks the UDP counters of /status and
// /metrics against them.
func TestStatusAndMetricsCountUDP(t *testing.T) {
	const flows, perFlow, size = 4, 25, 100
	top := newTopology(t, 1, flows, 2)
	svc := udpEchoService(t, top, "game", udpEchoPort)
	startLB(t, top.LB, withAdmin(udpConf(svc)))

	c := top.Clients[0]
	var replyBytes uint64
	for _, src := range c.Addrs4 {
		cl := newUDPClient(t, c.NS, src, svc.Listen)
		for i := range perFlow {
			r, err := cl.exchange(bytes.Repeat([]byte{byte(i)}, size), udpIOTimeout)
			if err != nil {
				t.Fatal(err)
			}
			replyBytes += uint64(len(r.Backend) + 1 + len(r.Seen.String()) + 1 + len(r.Data))
		}
	}
	var st struct {
		Services []struct {
			UDP *struct {
				DatagramsToBackend uint64            `json:"datagrams_to_backend"`
				BytesToBackend     uint64            `json:"bytes_to_backend"`
				DatagramsToClient  uint64            `json:"datagrams_to_client"`
				BytesToClient      uint64            `json:"bytes_to_client"`
				FlowsActive        int64             `json:"flows_active"`
				FlowsCreated       uint64            `json:"flows_created"`
				Drops              map[string]uint64 `json:"drops"`
			} `json:"udp"`
		} `json:"services"`
	}
	if err := json.Unmarshal(adminGet(t, top.LB, "/status"), &st); err != nil {
		t.Fatal(err)
	}
	u := st.Services[0].UDP
	if u == nil {
		t.Fatal("/status has no udp counters for a UDP service")
	}
	const datagrams = flows * perFlow
	if u.DatagramsToBackend != datagrams || u.BytesToBackend != datagrams*size || u.DatagramsToClient != datagrams ||
		u.BytesToClient != replyBytes || u.FlowsActive != flows || u.FlowsCreated != flows {
		t.Errorf("/status udp: %+v; want %d datagrams and %d bytes to backends, %d datagrams and %d bytes back, %d flows active and created",
			*u, datagrams, datagrams*size, datagrams, replyBytes, flows)
	}
	var dropped uint64
	for _, n := range u.Drops {
		dropped += n
	}
	if len(u.Drops) == 0 || dropped != 0 {
		t.Errorf("/status udp drops: %v; want every reason listed at 0", u.Drops)
	}

	families := parseMetrics(t, adminGet(t, top.LB, "/metrics"))
	for _, m := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"l4lb_udp_datagrams_total", map[string]string{"service": "game", "direction": "to_backend"}, datagrams},
		{"l4lb_udp_datagrams_total", map[string]string{"service": "game", "direction": "to_client"}, datagrams},
		{"l4lb_udp_bytes_total", map[string]string{"service": "game", "direction": "to_backend"}, datagrams * size},
		{"l4lb_udp_flows_active", map[string]string{"service": "game"}, flows},
		{"l4lb_udp_flows_total", map[string]string{"service": "game", "event": "created"}, flows},
	} {
		if got := metricValue(t, families, m.name, m.labels); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
}
