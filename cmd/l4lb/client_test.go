package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// statusText is the table `l4lb status` prints for the /status document doc.
func statusText(t *testing.T, doc string) string {
	t.Helper()
	var st statusJSON
	if err := json.Unmarshal([]byte(doc), &st); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printStatus(&out, st)
	return out.String()
}

// TestPrintStatusTurnedAway decodes a /status document as the admin
// endpoint writes it and checks that the table is followed by what each
// service turned away, naming only the reasons that happened.
func TestPrintStatusTurnedAway(t *testing.T) {
	const doc = `{"version": 3, "hash": "abcdef0123456789", "loaded_at": "2026-11-23T10:00:00Z",
	"services": [
	  {"name": "pg", "listen": "10.0.0.1:5432", "protocol": "tcp", "refused": 2,
	   "rejected": {"max_connections_per_source": 5, "denied": 0, "bad_proxy_header": 1},
	   "backends": [{"address": "10.0.0.11:5432", "weight": 100, "configured": true, "in_route": true,
	                 "health": "up", "active": 4, "total": 9}]},
	  {"name": "game", "listen": "10.0.0.1:7777", "protocol": "udp",
	   "udp": {"flows_refused": 3, "drops": {"max_flows": 3, "denied": 7, "no_backend": 0}},
	   "backends": []},
	  {"name": "quiet", "listen": "10.0.0.1:80", "protocol": "tcp", "backends": []}
	]}`
	text := statusText(t, doc)
	for _, want := range []string{
		"config version 3",
		"pg       10.0.0.1:5432/tcp  10.0.0.11:5432",
		"pg turned away: no backend 2, bad_proxy_header 1, max_connections_per_source 5\n",
		"game turned away: flows refused 3, dropped denied 7, dropped max_flows 3\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status output lacks %q:\n%s", want, text)
		}
	}
	for _, unwanted := range []string{"quiet turned away", "denied 0", "no_backend"} {
		if strings.Contains(text, unwanted) {
			t.Errorf("status output has %q:\n%s", unwanted, text)
		}
	}
}

// A reload error that a later successful reload fixed is shown as past,
// not as if the running config were broken.
func TestPrintStatusReloadErrorSinceFixed(t *testing.T) {
	for _, c := range []struct {
		okAt, want string
	}{
		{"", "last reload error (2026-11-23T10:05:00Z)"},
		{`"last_reload_ok_at": "2026-11-23T10:01:00Z",`, "last reload error (2026-11-23T10:05:00Z)"},
		{`"last_reload_ok_at": "2026-11-23T10:09:00Z",`, "earlier reload error (a reload succeeded since, at 2026-11-23T10:09:00Z) (2026-11-23T10:05:00Z)"},
	} {
		doc := `{"version": 2, "hash": "abcdef0123456789", "loaded_at": "2026-11-23T10:00:00Z", ` + c.okAt + `
		"last_reload_error": "l4lb.toml: services.pg.wieght: unknown key", "last_reload_error_at": "2026-11-23T10:05:00Z", "services": []}`
		if text := statusText(t, doc); !strings.Contains(text, c.want+":\n  l4lb.toml: services.pg.wieght") {
			t.Errorf("ok at %q: want %q in:\n%s", c.okAt, c.want, text)
		}
	}
}

// Backends of a service without checks show "no check", not "up"; a
// checked backend that is down shows why, under the table.
func TestPrintStatusHealth(t *testing.T) {
	const doc = `{"version": 1, "hash": "abcdef0123456789", "loaded_at": "2026-11-23T10:00:00Z",
	"services": [
	  {"name": "pg", "listen": "10.0.0.1:5432", "protocol": "tcp",
	   "backends": [{"address": "10.0.0.11:5432", "weight": 100, "configured": true, "health": "down",
	                 "last_failure": "dial tcp 10.0.0.11:5432: connect: connection refused"},
	                {"address": "10.0.0.12:5432", "weight": 100, "configured": true, "in_route": true, "health": "up"}]},
	  {"name": "web", "listen": "10.0.0.1:80", "protocol": "tcp", "unchecked": true,
	   "backends": [{"address": "10.0.0.21:80", "weight": 100, "configured": true, "in_route": true, "health": "up"}]}
	]}`
	text := statusText(t, doc)
	for _, want := range []string{
		"10.0.0.12:5432  100     no      up",
		"10.0.0.21:80    100     no      no check",
		"pg 10.0.0.11:5432 down: dial tcp 10.0.0.11:5432: connect: connection refused\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status output lacks %q:\n%s", want, text)
		}
	}
}

// A backup backend says so in its row, and a service whose new
// connections go to its backups says so under the table; one that routes
// to its primaries does not.
func TestPrintStatusBackups(t *testing.T) {
	const doc = `{"version": 1, "hash": "abcdef0123456789", "loaded_at": "2026-11-23T10:00:00Z",
	"services": [
	  {"name": "pg", "listen": "10.0.0.1:5432", "protocol": "tcp", "routing_to_backups": true,
	   "backends": [{"address": "10.0.0.11:5432", "weight": 100, "configured": true, "health": "down"},
	                {"address": "10.0.0.12:5432", "weight": 100, "configured": true, "backup": true, "in_route": true, "health": "up"}]},
	  {"name": "web", "listen": "10.0.0.1:80", "protocol": "tcp", "routing_to_backups": false,
	   "backends": [{"address": "10.0.0.21:80", "weight": 100, "configured": true, "in_route": true, "health": "up"},
	                {"address": "10.0.0.22:80", "weight": 100, "configured": true, "backup": true, "health": "up"}]}
	]}`
	text := statusText(t, doc)
	for _, want := range []string{
		"WEIGHT  BACKUP  HEALTH",
		"10.0.0.11:5432  100     no      down    no",
		"10.0.0.12:5432  100     yes     up      yes",
		"10.0.0.22:80    100     yes     up      no",
		"pg routes to its backups: no primary backend is usable\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status output lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "web routes to its backups") {
		t.Errorf("a service routing to its primaries said it routes to its backups:\n%s", text)
	}
}

// l4lb reload succeeds only on l4lb's own answer of success: 200 with a
// version. Another server's answer, whatever its status and body, is a
// failure, or systemctl reload (ExecReload=l4lb reload) would pass
// against it.
func TestReloadCommandChecksTheAnswer(t *testing.T) {
	for _, c := range []struct {
		name   string
		status int
		body   string
		code   int
		output string
	}{
		{"applied", http.StatusOK, `{"old_version": 1, "version": 2, "changes": "pg: +10.0.0.13:5432"}`, 0, "reloaded: version 1 -> 2: pg: +10.0.0.13:5432"},
		{"unchanged", http.StatusOK, `{"old_version": 2, "version": 2}`, 0, "config unchanged, version 2"},
		{"rejected", http.StatusUnprocessableEntity, `{"old_version": 2, "version": 2, "error": "l4lb.toml: services.pg.wieght: unknown key"}`, 1, "reload rejected, version 2 still serving:\nl4lb.toml: services.pg.wieght: unknown key"},
		{"stopping", http.StatusServiceUnavailable, `{"old_version": 2, "version": 2, "error": "l4lb is stopping: nothing to reload"}`, 1, "l4lb reload: l4lb is stopping: nothing to reload"},
		{"server error with JSON", http.StatusInternalServerError, `{"status": "error"}`, 1, "answered 500 Internal Server Error: not an l4lb admin endpoint"},
		{"not found", http.StatusNotFound, `{}`, 1, "answered 404 Not Found: not an l4lb admin endpoint"},
		{"other JSON with 200", http.StatusOK, `{"status": "ok"}`, 1, "answered 200 OK: not an l4lb admin endpoint"},
		{"HTML with 200", http.StatusOK, `<html>welcome</html>`, 1, "answered 200 OK: not an l4lb admin endpoint"},
		{"error with 200", http.StatusOK, `{"old_version": 2, "version": 2, "error": "x"}`, 1, "not an l4lb admin endpoint"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(c.status)
				io.WriteString(w, c.body)
			}))
			defer ts.Close()
			var out bytes.Buffer
			if code := runMain([]string{"reload", "-admin", ts.URL}, &out, &out); code != c.code || !strings.Contains(out.String(), c.output) {
				t.Errorf("exit %d, output %q; want exit %d and %q", code, out.String(), c.code, c.output)
			}
		})
	}
}

// While l4lb stops, the table says so, and every backend of a draining
// service shows it.
func TestPrintStatusStopping(t *testing.T) {
	const doc = `{"version": 1, "hash": "abcdef0123456789", "loaded_at": "2026-11-23T10:00:00Z", "stopping": true,
	"services": [
	  {"name": "pg", "listen": "10.0.0.1:5432", "protocol": "tcp", "draining": true,
	   "backends": [{"address": "10.0.0.11:5432", "weight": 100, "configured": true, "in_route": true, "health": "up", "active": 3}]}
	]}`
	text := statusText(t, doc)
	for _, want := range []string{
		"stopping: no service accepts; open connections drain within each drain_timeout\n",
		"10.0.0.11:5432  100     no      up      yes     3       0      0       stopping",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status output lacks %q:\n%s", want, text)
		}
	}
}
