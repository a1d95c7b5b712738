package health

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// FirstProbeSpread bounds the random delay before a new target's first
// probe. A new backend takes no traffic until it has been probed, so the
// first probe comes almost at once; the spread only keeps the backends of
// a fresh config from being probed all at the same instant.
const FirstProbeSpread = 100 * time.Millisecond

// shortageWarnEvery is how often at most a Checker warns of probes that
// decided nothing for this host's shortage: while descriptors or ports run
// out, every probe of every backend would otherwise log a line.
const shortageWarnEvery = 10 * time.Second

// Result is the outcome of one probe.
type Result struct {
	// Err is nil when the backend passed.
	Err  error
	Took time.Duration
}

// Detail describes the result in a few words, for logs and status views.
func (r Result) Detail() string {
	if r.Err != nil {
		return r.Err.Error()
	}
	return fmt.Sprintf("ok in %v", r.Took.Round(time.Microsecond))
}

// Observer receives the results of one target's probes, one call at a
// time, from the target's prober goroutine; a probe that failed for this
// host's own shortage is not a result and never reaches it. It should
// return quickly: the next probe waits for it, and so does a Set that
// stops its target. It must not call the Checker.
type Observer interface {
	Observe(Result)
}

// Target is one backend to check.
type Target struct {
	// Key names the target. A Set that repeats a key with the same Addr,
	// Spec and Observer keeps its prober running, on its own schedule.
	Key string
	// Addr is where probes go (the traffic address, or the check port).
	Addr netip.AddrPort
	Spec Spec
	// Observer must be comparable (a pointer, typically): Set compares
	// targets to find the changed ones.
	Observer Observer
}

// Checker runs one prober goroutine per target: probes of a target never
// overlap (the next starts Interval after the previous one started, or
// when it ends if it took longer), and the targets' schedules are offset
// from one another by random delays, so a pool of backends is not probed in
// lockstep. The Checker does not decide anything: it hands each result to
// the target's Observer, except a probe that failed for this host's own
// shortage (out of descriptors, memory or local ports), which says nothing
// about the backend: it is dropped, with a warning at most every
// shortageWarnEvery.
//
// A Checker starts probing on Set; Close stops it. The owner of the Checker
// closes it; Observers are never called after Close returns.
type Checker struct {
	log hclog.Logger
	// dial opens the probes' connections; tests replace it before the
	// first Set.
	dial dialFunc

	mu sync.Mutex // guards probers and closed
	// probers is keyed by Target.Key.
	probers map[string]*prober
	closed  bool

	running sync.WaitGroup // prober goroutines

	warnMu sync.Mutex // guards lastShortageWarn and shortages
	// lastShortageWarn is when the last inconclusive probe was logged;
	// shortages counts the inconclusive probes since.
	lastShortageWarn time.Time
	shortages        int
}

// prober is the goroutine of one target.
type prober struct {
	target Target
	cancel context.CancelFunc
	done   chan struct{} // closed when the goroutine has returned
}

// NewChecker returns a checker with no targets.
func NewChecker(log hclog.Logger) *Checker {
	return &Checker{log: log, dial: (&net.Dialer{}).DialContext, probers: make(map[string]*prober)}
}

// Set makes targets the checked set: probers start for new keys, stop for
// keys that are gone, and restart for keys whose target changed. An invalid
// Spec is reported in the error (joined with the others) and its target is
// not probed; the valid ones are all applied.
//
// Set returns once the probers it stops have returned: probes in flight
// are cut short and their results dropped, and no Observer of a removed
// or changed target is called after Set returns. Its owner can then
// change the state the Observers fed (checks turned off) without a late
// result undoing it.
func (c *Checker) Set(targets []Target) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("health checker is closed")
	}
	var errs []error
	wanted := make(map[string]bool, len(targets))
	type start struct {
		t Target
		p Prober
	}
	starts := make(map[string]start) // by key; a repeated key's last target wins
	var stopped []*prober
	for _, t := range targets {
		wanted[t.Key] = true
		old := c.probers[t.Key]
		if old != nil && old.target == t {
			continue
		}
		if old != nil {
			stopped = append(stopped, old)
			delete(c.probers, t.Key)
		}
		delete(starts, t.Key)
		p, err := newProber(t.Spec, c.dial)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", t.Key, err))
			continue
		}
		starts[t.Key] = start{t, p}
	}
	for key, pr := range c.probers {
		if !wanted[key] {
			stopped = append(stopped, pr)
			delete(c.probers, key)
		}
	}
	// Stop before starting, so that a restarted target never has two
	// probes in flight. Cancelled probes return at once; the probers do not
	// take c.mu.
	for _, pr := range stopped {
		pr.cancel()
	}
	for _, pr := range stopped {
		<-pr.done
	}
	for key, s := range starts {
		ctx, cancel := context.WithCancel(context.Background())
		pr := &prober{target: s.t, cancel: cancel, done: make(chan struct{})}
		c.probers[key] = pr
		c.running.Add(1)
		go c.run(ctx, pr, s.p)
	}
	return errors.Join(errs...)
}

// Close stops every prober and returns once they have all returned. Probes
// in flight are cut short and their results dropped. Close may be called
// more than once.
func (c *Checker) Close() {
	c.mu.Lock()
	c.closed = true
	for key, pr := range c.probers {
		pr.cancel()
		delete(c.probers, key)
	}
	c.mu.Unlock()
	c.running.Wait()
}

// run probes one target until ctx ends.
func (c *Checker) run(ctx context.Context, pr *prober, p Prober) {
	defer c.running.Done()
	defer close(pr.done)
	t := pr.target
	timer := time.NewTimer(jitter(min(t.Spec.Interval, FirstProbeSpread)))
	defer timer.Stop()
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, t.Spec.Timeout)
		err := p.Probe(pctx, t.Addr)
		cancel()
		if ctx.Err() != nil {
			return // stopped mid-probe: the result says nothing about the backend
		}
		res := Result{Err: err, Took: time.Since(start)}
		if LocalShortage(err) {
			// Neither a success nor a failure: the backend's counts stay.
			c.warnShortage(t, err)
		} else {
			if err != nil && c.log.IsDebug() {
				c.log.Debug("probe failed", "target", t.Key, "addr", t.Addr, "error", err)
			}
			t.Observer.Observe(res)
		}
		next := t.Spec.Interval
		if n == 0 {
			// After the prompt first probe, move this target to a random
			// phase of the interval, so that targets created together are
			// not probed together from then on.
			next = t.Spec.Interval/2 + jitter(t.Spec.Interval/2)
		}
		timer.Reset(max(0, next-time.Since(start)))
	}
}

// warnShortage logs a probe of t that failed for this host's shortage, at
// most once every shortageWarnEvery, with the number of such probes since
// the last line.
func (c *Checker) warnShortage(t Target, err error) {
	c.warnMu.Lock()
	c.shortages++
	n := c.shortages
	now := time.Now()
	if !c.lastShortageWarn.IsZero() && now.Sub(c.lastShortageWarn) < shortageWarnEvery {
		c.warnMu.Unlock()
		return
	}
	c.lastShortageWarn, c.shortages = now, 0
	c.warnMu.Unlock()
	c.log.Warn("health probe inconclusive: this host is short of descriptors, memory or local ports; the backend's health is left as it was",
		"target", t.Key, "addr", t.Addr, "error", err, "inconclusive_probes", n)
}

// jitter is a random duration in [0, d).
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}
