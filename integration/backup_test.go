package integration

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"testing"
	"time"
)

// TestBackupTakesOverFromPrimary runs a primary and a backup (backup =
// true), as a database's primary and standby: clients reach only the
// primary while it is up; once its server is stopped and its checks mark
// it down, new clients reach the backup; once it is started again and
// back up, new clients reach the primary again, and a connection opened
// on the backup meanwhile still works. /metrics follows: which of them
// takes new clients (backend_up), that both are healthy while the backup
// waits, and whether the service routes to its backups. With
// on_failback = "close" that connection is closed instead once the
// primary is back.
func TestBackupTakesOverFromPrimary(t *testing.T) {
	for _, onFailback := range []string{"keep", "close"} {
		t.Run(onFailback, func(t *testing.T) { backupTakesOverFromPrimary(t, onFailback) })
	}
}

func backupTakesOverFromPrimary(t *testing.T, onFailback string) {
	const interval, timeout, rise, fall = 300 * time.Millisecond, 200 * time.Millisecond, 2, 3
	top := newTopology(t, 1, 4, 2)
	primaryNS, backupNS := top.Backends[0], top.Backends[1]
	primary, backup := netip.AddrPortFrom(primaryNS.Addr4, echoPort), netip.AddrPortFrom(backupNS.Addr4, echoPort)
	listen := netip.AddrPortFrom(vip4, echoPort)
	conf := fmt.Sprintf(`[admin]
listen = ""

[services.db]
listen = %q
balance = "maglev"
hash_key = "source_ip"
workers = 2
connect_timeout = "1s"
idle_timeout = "1m"
drain_timeout = "2s"
on_failback = %q
[services.db.health]
%s
[[services.db.backends]]
address = %q
[[services.db.backends]]
address = %q
backup = true
`, listen, onFailback, tcpCheck(interval, timeout, rise, fall), primary, backup)
	stopPrimary := serveBackend(t, primaryNS.NS, primaryNS.Name, primary, echo)
	startBackend(t, backupNS.NS, backupNS.Name, backup, echo)
	l := startLB(t, top.LB, withAdmin(conf))
	for _, a := range []netip.AddrPort{primary, backup} {
		if _, _, err := waitLog(l.process, 0, 5*time.Second, transitionTo(a, "up")...); err != nil {
			t.Fatal(err)
		}
	}
	client := top.Clients[0]
	// everyClientReaches dials from every source address of the client
	// namespace and fails unless each reached the backend named want.
	everyClientReaches := func(when, want string) {
		t.Helper()
		for _, src := range client.Addrs4 {
			name, _, err := greeting(client.NS, src, listen)
			if err != nil || name != want {
				t.Fatalf("%s: client %s reached %q (%v), want %s", when, src, name, err, want)
			}
		}
	}
	// wantMetrics fails unless /metrics gives routing_to_backups and, for
	// the primary and the backup, backend_up and backend_healthy.
	wantMetrics := func(when string, routing float64, primaryUp, primaryHealthy, backupUp, backupHealthy float64) {
		t.Helper()
		families := parseMetrics(t, adminGet(t, top.LB, "/metrics"))
		if got := metricValue(t, families, "l4lb_service_routing_to_backups", map[string]string{"service": "db"}); got != routing {
			t.Errorf("%s: l4lb_service_routing_to_backups = %v, want %v", when, got, routing)
		}
		for _, b := range []struct {
			addr        netip.AddrPort
			up, healthy float64
		}{{primary, primaryUp, primaryHealthy}, {backup, backupUp, backupHealthy}} {
			labels := map[string]string{"service": "db", "backend": b.addr.String()}
			up, healthy := metricValue(t, families, "l4lb_backend_up", labels), metricValue(t, families, "l4lb_backend_healthy", labels)
			if up != b.up || healthy != b.healthy {
				t.Errorf("%s: %s backend_up %v, backend_healthy %v; want %v, %v", when, b.addr, up, healthy, b.up, b.healthy)
			}
		}
	}
	everyClientReaches("primary up", primaryNS.Name)
	wantMetrics("primary up", 0, 1, 1, 0, 1)

	// A health change reaches the route within rebuildDelay (100 ms) of
	// the transition; the route is published before the rebuild's line.
	const rebuild = 100 * time.Millisecond
	mark := logMark(l.process)
	stopPrimary()
	if _, _, err := waitLog(l.process, mark, fall*interval+timeout+rebuild+healthSlack, "no usable primary backend: routing to 1 backups", "service=db"); err != nil {
		t.Fatalf("primary stopped: %v", err)
	}
	if _, _, err := waitLog(l.process, mark, healthSlack, "routing table rebuilt", "backups=true"); err != nil {
		t.Fatalf("primary stopped: %v", err)
	}
	everyClientReaches("primary stopped", backupNS.Name)
	wantMetrics("primary stopped", 1, 0, 0, 1, 1)
	onBackup, err := dialFrom(client.NS, client.Addrs4[0], listen)
	if err != nil {
		t.Fatal(err)
	}
	defer onBackup.Close()
	onBackup.SetDeadline(time.Now().Add(ioTimeout))
	br := bufio.NewReader(onBackup)
	if name, err := readGreeting(br); err != nil || name != backupNS.Name {
		t.Fatalf("connection opened with the primary stopped reached %q (%v), want the backup", name, err)
	}

	mark = logMark(l.process)
	serveBackend(t, primaryNS.NS, primaryNS.Name, primary, echo)
	if _, _, err := waitLog(l.process, mark, rise*interval+rebuild+healthSlack, "primary backend usable again: routing to primaries", "service=db"); err != nil {
		t.Fatalf("primary started again: %v", err)
	}
	if _, _, err := waitLog(l.process, mark, healthSlack, "routing table rebuilt", "backups=false"); err != nil {
		t.Fatalf("primary started again: %v", err)
	}
	everyClientReaches("primary started again", primaryNS.Name)
	wantMetrics("primary started again", 0, 1, 1, 0, 1)

	if onFailback == "close" {
		if _, _, err := waitLog(l.process, mark, healthSlack, "failback: closing 1 connections on backups", "service=db"); err != nil {
			t.Fatalf("primary started again: %v", err)
		}
		if line, err := br.ReadString('\n'); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the connection to the backup read %q, %v once the primary was back; want it closed (on_failback = \"close\")", line, err)
		}
		return
	}
	const msg = "still served by the backup\n"
	if _, err := io.WriteString(onBackup, msg); err != nil {
		t.Fatalf("write on the connection to the backup once the primary was back: %v", err)
	}
	if line, err := br.ReadString('\n'); err != nil || line != msg {
		t.Fatalf("echo on the connection to the backup once the primary was back: %q, %v", line, err)
	}
}
