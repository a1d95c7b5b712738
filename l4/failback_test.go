package l4

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/l4lb/l4lb/config"
)

// on_failback: what becomes of the connections open on the backups when
// the route moves from them back to the primaries. These tests run real
// services over loopback backends judged by real health checks, as the
// backup tests do (backup_test.go).

// failbackService runs a service of a primary p and a backup b under
// onFailback and waits for the primary to be routed and the backup up.
func failbackService(t *testing.T, onFailback config.OnFailback, edit func(cfg *config.Service)) (p, b *namedBackend, addr netip.AddrPort, s *Service, logs *lockedBuffer) {
	t.Helper()
	p, b = newNamedBackend(t, "p"), newNamedBackend(t, "b")
	cfg := checkedConfig(p.addr, b.addr)
	cfg.Backends[1].Backup = true
	cfg.OnFailback = onFailback
	if edit != nil {
		edit(cfg)
	}
	addr, s, logs = loggedService(t, cfg)
	eventually(t, "the backup up, the primary routed", func() bool {
		return isUp(s, b.addr)() && sameAddrs(routed(s), p.addr)
	})
	return p, b, addr, s, logs
}

// failOver stops the primary's server and returns a client served by the
// backup once the checks have moved the route there.
func failOver(t *testing.T, p, b *namedBackend, addr netip.AddrPort, s *Service) net.Conn {
	t.Helper()
	p.stop()
	eventually(t, "the backup routed", func() bool { return sameAddrs(routed(s), b.addr) })
	name, onBackup := dialNamed(t, addr)
	if name != "b" {
		t.Fatalf("client with the primary down served by %q, want the backup", name)
	}
	roundTrip(t, onBackup, "on the backup")
	return onBackup
}

// edited is a copy of cfg with its backends changed by edit, for a
// reload.
func edited(cfg *config.Service, edit func(bs []config.Backend) []config.Backend) *config.Service {
	next := *cfg
	next.Backends = edit(append([]config.Backend(nil), cfg.Backends...))
	return &next
}

// A primary whose checks fail sends new clients to the backup; once its
// checks pass again, on_failback = "close" closes the connection opened
// on the backup meanwhile, and "keep" leaves it. New clients reach the
// primary either way.
func TestFailbackAfterHealthChecks(t *testing.T) {
	for _, onFailback := range []config.OnFailback{config.OnFailbackKeep, config.OnFailbackClose} {
		t.Run(string(onFailback), func(t *testing.T) {
			p, b, addr, s, logs := failbackService(t, onFailback, nil)
			onBackup := failOver(t, p, b, addr, s)

			p.start()
			eventually(t, "the primary routed again", func() bool { return sameAddrs(routed(s), p.addr) })
			if name, _ := dialNamed(t, addr); name != "p" {
				t.Errorf("client after the failback served by %q, want the primary", name)
			}
			if onFailback == config.OnFailbackKeep {
				roundTrip(t, onBackup, "still on the backup")
				if strings.Contains(logs.String(), "failback: closing") {
					t.Errorf("on_failback = \"keep\" logged a close:\n%s", logs.String())
				}
				return
			}
			expectClosed(t, onBackup)
			wantLog(t, logs, "failback: closing 1 connections on backups")
			eventually(t, "the backup's connection gone", func() bool { return backendOf(s, b.addr).active.Load() == 0 })
		})
	}
}

// The backups going down too (every backend down, panic_mode = "none")
// leaves their clients under on_down = "keep": the primary's return
// after that is a failback all the same, and on_failback = "close"
// closes them.
func TestFailbackAfterBackupsDown(t *testing.T) {
	p, b, addr, s, logs := failbackService(t, config.OnFailbackClose, nil)
	onBackup := failOver(t, p, b, addr, s)

	b.stop() // its listener only: the connection goes on
	eventually(t, "nothing routed", func() bool { return s.route.Load().balancer == nil })
	roundTrip(t, onBackup, "on the backup marked down")
	p.start()
	eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), p.addr) })
	expectClosed(t, onBackup)
	wantLog(t, logs, "failback: closing 1 connections on backups")
}

// A failback by reload (the primary's weight back from 0 to 100, after
// maintenance) closes the backup's connections under on_failback =
// "close" as one by the checks does, at the swap, even when the same
// reload removes the backup (which would otherwise drain it); the
// primary's own connection, draining at weight 0 meanwhile, goes on.
func TestFailbackByReload(t *testing.T) {
	for _, tt := range []struct {
		name         string
		removeBackup bool
	}{
		{"weight back", false},
		{"weight back, backup removed", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, addr, s, logs := failbackService(t, config.OnFailbackClose, func(cfg *config.Service) { cfg.DrainTimeout = time.Minute })
			cfg := s.route.Load().cfg
			_, onPrimary := dialNamed(t, addr)

			s.Update(edited(cfg, func(bs []config.Backend) []config.Backend { bs[0].Weight = 0; return bs }))
			name, onBackup := dialNamed(t, addr)
			if name != "b" {
				t.Fatalf("client with the primary at weight 0 served by %q, want the backup", name)
			}

			s.Update(edited(cfg, func(bs []config.Backend) []config.Backend {
				if tt.removeBackup {
					return bs[:1]
				}
				return bs
			}))
			expectClosed(t, onBackup)
			wantLog(t, logs, "failback: closing 1 connections on backups")
			roundTrip(t, onPrimary, "on the primary, back from weight 0")
			if name, _ := dialNamed(t, addr); name != "p" {
				t.Errorf("client after the reload served by %q, want the primary", name)
			}
		})
	}
}

// on_failback = "close" closes nothing when the route was not on the
// backups: a backup's connection opened while it was a primary stays
// when a reload makes it a backup again, and drains when a reload
// removes it; a connection that panic_mode = "all" put on a backup stays
// when the checks bring the primary back straight from the panic.
func TestFailbackNotFromBackups(t *testing.T) {
	t.Run("reloads", func(t *testing.T) {
		p, b := newNamedBackend(t, "p"), newNamedBackend(t, "b")
		cfg := checkedConfig(p.addr, b.addr)
		cfg.Balance = config.RoundRobin
		cfg.OnFailback = config.OnFailbackClose
		cfg.DrainTimeout = time.Minute
		addr, s, logs := loggedService(t, cfg)
		eventually(t, "both routed", func() bool { return len(routed(s)) == 2 })
		var onB net.Conn
		for i := 0; onB == nil && i < 4; i++ {
			if name, c := dialNamed(t, addr); name == "b" {
				onB = c
			}
		}
		if onB == nil {
			t.Fatal("round robin over two primaries never chose b")
		}

		s.Update(edited(cfg, func(bs []config.Backend) []config.Backend { bs[1].Backup = true; return bs }))
		roundTrip(t, onB, "b made a backup")
		s.Update(edited(cfg, func(bs []config.Backend) []config.Backend { return bs[:1] }))
		roundTrip(t, onB, "b removed, draining")
		if strings.Contains(logs.String(), "failback: closing") {
			t.Errorf("reloads that never routed to the backups logged a failback:\n%s", logs.String())
		}
	})

	t.Run("panic", func(t *testing.T) {
		p, b := newNamedBackend(t, "p"), newNamedBackend(t, "b")
		cfg := checkedConfig(p.addr, b.addr)
		cfg.Backends[1].Backup = true
		cfg.Balance = config.RoundRobin
		// The backup's checks always fail: had it come up before the
		// primary, the route would have been on the backups in between,
		// and the primary's return a failback.
		cfg.Health.Kind, cfg.Health.ExpectRegex = config.HealthSendExpect, "^p"
		cfg.PanicMode = config.PanicAll
		cfg.OnFailback = config.OnFailbackClose
		addr, s, logs := loggedService(t, cfg)
		eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), p.addr) })

		p.stop()
		eventually(t, "panic: both routed", func() bool { return s.route.Load().panicking && len(routed(s)) == 2 })
		name, onBackup := dialNamed(t, addr) // the primary refuses it
		if name != "b" {
			t.Fatalf("client in panic mode with the primary stopped served by %q, want the backup", name)
		}

		p.start()
		eventually(t, "the primary routed", func() bool { return sameAddrs(routed(s), p.addr) })
		roundTrip(t, onBackup, "on the backup after the panic")
		if strings.Contains(logs.String(), "failback: closing") {
			t.Errorf("the end of a panic logged a failback:\n%s", logs.String())
		}
	})
}

// A connect to the backup still in flight when the route fails back
// under on_failback = "close" goes to the primary once it completes: the
// close swept the backup's connections before this one was among them,
// and the client has sent nothing through yet.
func TestFailbackReachesConnectInFlight(t *testing.T) {
	p := newNamedBackend(t, "p")
	b := newSlowBackend(t) // its connects hang until released
	check := newRestartable(t)
	cfg := checkedConfig(p.addr, b.addr)
	cfg.Backends[0].Weight = 0 // maintenance: the route is on the backup
	cfg.Backends[1].Backup = true
	cfg.Health.Port = check.addr.Port()
	cfg.OnFailback = config.OnFailbackClose
	cfg.ConnectTimeout = 10 * time.Second
	addr, s := startService(t, time.Minute)
	s.Update(cfg)
	eventually(t, "the backup routed", func() bool { return sameAddrs(routed(s), b.addr) })

	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	eventually(t, "the connect to the backup in flight", func() bool { return backendOf(s, b.addr).active.Load() == 1 })
	s.Update(edited(cfg, func(bs []config.Backend) []config.Backend { bs[0].Weight = 100; return bs }))
	eventually(t, "the primary up and routed", func() bool { return isUp(s, p.addr)() && sameAddrs(routed(s), p.addr) })
	b.release(t)

	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	greeting := make([]byte, 2)
	if _, err := c.Read(greeting); err != nil || string(greeting) != "p\n" {
		t.Fatalf("client whose connect to the backup was in flight at the failback: read %q, %v; want the primary's greeting", greeting, err)
	}
}

// A UDP flow on the backup ends when the route fails back under
// on_failback = "close", as a drain ends it: the client's next datagram
// opens a flow on the primary. Under "keep" it stays on the backup.
func TestUDPFailback(t *testing.T) {
	for _, onFailback := range []config.OnFailback{config.OnFailbackKeep, config.OnFailbackClose} {
		t.Run(string(onFailback), func(t *testing.T) {
			p, b := newUDPEcho(t, "p"), newUDPEcho(t, "b")
			cfg := udpConfig(p.addr, b.addr)
			cfg.Backends[1].Backup = true
			cfg.OnFailback = onFailback
			svc, _ := startUDPService(t, cfg)

			svc.Update(edited(cfg, func(bs []config.Backend) []config.Backend { bs[0].Weight = 0; return bs }))
			onBackup := newUDPClient(t, cfg.Listen)
			if got := onBackup.exchange("during maintenance"); got != "b" {
				t.Fatalf("flow with the primary at weight 0 served by %q, want the backup", got)
			}

			svc.Update(cfg)
			want := "p"
			if onFailback == config.OnFailbackKeep {
				want = "b"
			}
			if got := onBackup.exchange("after the failback"); got != want {
				t.Errorf("the client of the backup answered by %q after the failback, want %q", got, want)
			}
			if onFailback == config.OnFailbackClose {
				waitUDPStats(t, svc, 2*time.Second, func(st UDPStats) bool { return st.FlowsClosed == 1 })
			}
		})
	}
}
