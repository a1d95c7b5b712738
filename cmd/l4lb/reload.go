package main

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/l4"
)

// reloadSettle is how long a reload waits after its trigger for more
// triggers to merge into it: an editor's save, a `mv` over the file and a
// SIGHUP from a deploy script often arrive together.
const reloadSettle = 100 * time.Millisecond

// reloader re-reads the config file and applies it, one reload at a time.
type reloader struct {
	path string
	srv  *l4.Server
	log  hclog.Logger

	mu          sync.Mutex // guards the fields below
	ok, failed  uint64
	lastError   string
	lastErrorAt time.Time
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
func (r *reloader) reload(ctx context.Context, reason string) {
	cfg, err := config.Load(r.path)
	if err == nil {
		var change l4.Change
		change, err = r.srv.Apply(ctx, cfg)
		if err == nil {
			r.mu.Lock()
			r.ok++
			r.mu.Unlock()
			if change.Version == change.OldVersion {
				r.log.Debug("reload: config unchanged", "trigger", reason, "version", change.Version)
				return
			}
			r.log.Info("reloaded", "trigger", reason, "version", change.OldVersion, "new_version", change.Version,
				"hash", cfg.Hash[:12], "changes", change.Summary)
			return
		}
	}
	r.mu.Lock()
	r.failed++
	r.lastError = err.Error()
	r.lastErrorAt = time.Now()
	failed := r.failed
	r.mu.Unlock()
	version, _, _ := r.srv.Version()
	r.log.Error("reload rejected, still serving the running config", "trigger", reason, "version", version,
		"failed_total", failed, "error", err.Error())
}
