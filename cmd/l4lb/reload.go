package main

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// reloadSettle is how long a reload waits after its trigger for more
// triggers to merge into it: an editor's save, a `mv` over the file and a
// SIGHUP from a deploy script often arrive together.
const reloadSettle = 100 * time.Millisecond

// triggerFile is the reason of reloads the file watch asks for.
const triggerFile = "file change"

// reloader re-reads the config file and applies it, one reload at a time.
type reloader struct {
	path   string
	srv    *l4.Server
	log    hclog.Logger
	notify *notifier
	// done is cancelled when l4lb begins to stop: a reload under way,
	// whoever asked for it, then starts no new service (l4.Server.Apply).
	// Nil (never cancelled) in tests.
	done context.Context
	// admin is set once the admin endpoint exists; a reload rebinds it
	// when admin.listen changes.
	admin *admin
	// applied runs after a new config is applied: [log] settings and the
	// descriptor check.
	applied func(*config.Config)
	// logLevel is run's -log-level, which overrides each file's [log]
	// level, so that a reload neither changes the level nor says it did.
	logLevel string

	reloading sync.Mutex // held for a whole reload: triggers and POST /reload take turns
	// waiting is why the file watch last found no config to load ("" when
	// it last found one): a file removed, or created and not written yet,
	// is waited for, and said so once. Guarded by reloading.
	waiting string
	// stopped: l4lb is stopping, and reloads are refused (stop). Guarded
	// by reloading.
	stopped bool
	// upgraded: stopped because an upgrade's new process serves now.
	upgraded bool

	mu          sync.Mutex // guards the fields below
	ok, failed  uint64
	lastError   string
	lastErrorAt time.Time
	lastOKAt    time.Time
}

type reloadStats struct {
	ok, failed  uint64
	lastError   string
	lastErrorAt time.Time
	// lastOKAt is when a reload last succeeded, changed or not: a status
	// view tells from it whether the last error still stands.
	lastOKAt time.Time
}

func (r *reloader) stats() reloadStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return reloadStats{r.ok, r.failed, r.lastError, r.lastErrorAt, r.lastOKAt}
}

// context is the context of reloads: cancelled when l4lb stops, and only
// then (not when the client of a POST /reload goes away).
func (r *reloader) context() context.Context {
	if r.done == nil {
		return context.Background()
	}
	return r.done
}

// run reloads once per burst of triggers until ctx ends.
func (r *reloader) run(ctx context.Context, triggers <-chan string) {
	for {
		var reason string
		select {
		case <-ctx.Done():
			return
		case reason = <-triggers:
		}
		settle := time.NewTimer(reloadSettle)
	merge:
		for {
			select {
			case <-ctx.Done():
				settle.Stop()
				return
			case more := <-triggers:
				if more != reason {
					reason += "+" + more
				}
			case <-settle.C:
				break merge
			}
		}
		r.reload(ctx, reason)
	}
}

// reload applies the config file; a bad file, or one whose new sockets
// cannot be bound, leaves the running config serving.
func (r *reloader) reload(ctx context.Context, reason string) (l4.Change, error) {
	r.reloading.Lock()
	defer r.reloading.Unlock()
	if r.stopped {
		// Neither a failed reload nor READY=1 after STOPPING=1.
		version, _, _ := r.srv.Version()
		if r.upgraded {
			return l4.Change{OldVersion: version, Version: version}, errUpgraded
		}
		return l4.Change{OldVersion: version, Version: version}, errStopping
	}
	if reason == triggerFile {
		// Only for the watch: whoever sends SIGHUP or POST /reload for a
		// missing file hears that it is missing.
		if why := r.notWritten(); why != "" {
			version, _, _ := r.srv.Version()
			if why != r.waiting {
				r.log.Warn("config file "+why+": waiting for it to be written; the running config keeps serving",
					"config", r.path, "version", version)
				r.waiting = why
			}
			return l4.Change{OldVersion: version, Version: version}, nil
		}
	}
	r.waiting = ""
	if err := r.notify.reloading(); err != nil {
		r.log.Warn("cannot notify systemd", "error", err)
	}
	defer func() {
		if err := r.notify.ready("serving"); err != nil {
			r.log.Warn("cannot notify systemd", "error", err)
		}
	}()
	change, cfg, err := r.apply(ctx)
	if err != nil {
		r.mu.Lock()
		r.failed++
		r.lastError = err.Error()
		r.lastErrorAt = time.Now()
		failed := r.failed
		r.mu.Unlock()
		version, _, _ := r.srv.Version()
		r.log.Error("reload rejected, still serving the running config", "trigger", reason, "version", version,
			"failed_total", failed, "error", err.Error())
		return l4.Change{OldVersion: version, Version: version}, err
	}
	r.mu.Lock()
	r.ok++
	r.lastOKAt = time.Now()
	r.mu.Unlock()
	if change.Version == change.OldVersion {
		// At info for a SIGHUP or POST /reload: whoever sent it wants to
		// see that it was read. The watch's own are routine (a touch, a
		// chmod, a rewrite with the same bytes).
		level := hclog.Info
		if reason == triggerFile {
			level = hclog.Debug
		}
		r.log.Log(level, "reload: config unchanged, nothing to do", "trigger", reason, "version", change.Version)
		return change, nil
	}
	r.log.Info("reloaded", "trigger", reason, "version", change.OldVersion, "new_version", change.Version,
		"hash", cfg.Hash[:12], "changes", change.Summary)
	return change, nil
}

// errStopping is the answer to a reload asked for while l4lb stops.
var errStopping = errors.New("l4lb is stopping: nothing to reload")

// errUpgraded is the answer to a reload asked of a process an upgrade
// replaced while the reload waited.
var errUpgraded = errors.New("l4lb was upgraded: the new process serves now, from the config file as it read it at its start; ask it again")

// handOver runs upgrade while no reload runs, and refuses every reload
// from then on if it succeeds: the new process serves the config file.
func (r *reloader) handOver(upgrade func() error) error {
	r.reloading.Lock()
	defer r.reloading.Unlock()
	if r.stopped {
		return errStopping
	}
	err := upgrade()
	if err == nil {
		r.stopped, r.upgraded = true, true
	}
	return err
}

// stop refuses every reload from now on, once the one running, if any,
// has finished: l4lb is stopping.
func (r *reloader) stop() {
	r.reloading.Lock()
	defer r.reloading.Unlock()
	r.stopped = true
}

// notWritten says why the config file holds no config to load, "" when it
// may: removed (perhaps to be replaced), or empty (just created, or
// truncated to be rewritten), which no valid config is.
func (r *reloader) notWritten() string {
	fi, err := os.Stat(r.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "removed"
	case err == nil && fi.Size() == 0:
		return "empty"
	}
	return ""
}

// apply loads the file and applies it whole: the admin endpoint's new
// socket, if any, is bound before the services change, and released if
// they cannot (the old one, if paused for it, then listens again).
func (r *reloader) apply(ctx context.Context) (l4.Change, *config.Config, error) {
	cfg, err := config.Load(r.path)
	if err != nil {
		return l4.Change{}, nil, err
	}
	if r.logLevel != "" {
		cfg.Log.Level = r.logLevel
	}
	var adminLn net.Listener
	if r.admin != nil {
		if adminLn, err = r.admin.prepare(cfg.Admin.Listen); err != nil {
			return l4.Change{}, nil, err
		}
	}
	change, err := r.srv.Apply(ctx, cfg)
	if err != nil {
		if r.admin != nil {
			r.admin.abort(adminLn)
		}
		return change, nil, err
	}
	if r.admin != nil {
		r.admin.commit(cfg.Admin.Listen, adminLn)
	}
	if r.applied != nil {
		r.applied(cfg)
	}
	return change, cfg, nil
}

// metrics exports the reload counters.
func (r *reloader) metrics() prometheus.Collector {
	return reloadCollector{r}
}

type reloadCollector struct{ r *reloader }

var reloadsDesc = prometheus.NewDesc("l4lb_reloads_total", "Config reloads, by result: ok (applied or unchanged) or failed (rejected; the running config stayed).", []string{"result"}, nil)

func (c reloadCollector) Describe(ch chan<- *prometheus.Desc) { ch <- reloadsDesc }

func (c reloadCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.r.stats()
	ch <- prometheus.MustNewConstMetric(reloadsDesc, prometheus.CounterValue, float64(st.ok), "ok")
	ch <- prometheus.MustNewConstMetric(reloadsDesc, prometheus.CounterValue, float64(st.failed), "failed")
}
