package health

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// recorder is an Observer that keeps every result with its arrival time.
type recorder struct {
	mu      sync.Mutex // guards results and at
	results []Result
	at      []time.Time
	closed  atomic.Bool // set by the test after Close: no more calls allowed
	late    atomic.Int32
}

func (r *recorder) Observe(res Result) {
	if r.closed.Load() {
		r.late.Add(1)
	}
	r.mu.Lock()
	r.results = append(r.results, res)
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.results)
}

// waitCount waits up to 5 s for at least n results.
func (r *recorder) waitCount(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for r.count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d results after 5s, want %d", r.count(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newTestChecker(t *testing.T) *Checker {
	c := NewChecker(hclog.NewNullLogger())
	t.Cleanup(c.Close)
	return c
}

func connectSpec(interval time.Duration) Spec {
	return Spec{Kind: Connect, Network: "tcp", Interval: interval, Timeout: 500 * time.Millisecond, Rise: 2, Fall: 3}
}

// TestCheckerOneProbeInFlight probes a backend that never answers, with a
// timeout five times the interval: a probe must never start while the
// previous one is still waiting. The backend records when each probe
// connection opened and closed; the FIN of one probe may arrive just after
// the next connect, so overlaps under a few milliseconds are tolerated, far
// below the 50 ms a second probe in flight would overlap by.
func TestCheckerOneProbeInFlight(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type span struct{ open, closed time.Time }
	var mu sync.Mutex // guards spans
	var spans []span
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			opened := time.Now()
			go func() {
				io.Copy(io.Discard, c) // until the prober gives up and closes
				c.Close()
				mu.Lock()
				spans = append(spans, span{opened, time.Now()})
				mu.Unlock()
			}()
		}
	}()
	rec := &recorder{}
	c := newTestChecker(t)
	spec := Spec{Kind: SendExpect, Network: "tcp", Interval: 10 * time.Millisecond, Timeout: 50 * time.Millisecond, Rise: 1, Fall: 1, Send: "x", Expect: "y"}
	if err := c.Set([]Target{{Key: "silent", Addr: ln.Addr().(*net.TCPAddr).AddrPort(), Spec: spec, Observer: rec}}); err != nil {
		t.Fatal(err)
	}
	rec.waitCount(t, 6)
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	slices.SortFunc(spans, func(a, b span) int { return a.open.Compare(b.open) })
	const tolerance = 10 * time.Millisecond
	for i := 1; i < len(spans); i++ {
		if overlap := spans[i-1].closed.Sub(spans[i].open); overlap > tolerance {
			t.Errorf("probe %d started %v before probe %d ended", i, overlap, i-1)
		}
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for _, res := range rec.results[:5] {
		if res.Err == nil || res.Took < spec.Timeout {
			t.Errorf("probe result %+v: want a timeout after %v", res, spec.Timeout)
		}
	}
}

func TestCheckerSet(t *testing.T) {
	up := listen(t)
	c := newTestChecker(t)
	a, b := &recorder{}, &recorder{}
	ta := Target{Key: "a", Addr: up, Spec: connectSpec(time.Hour), Observer: a}
	tb := Target{Key: "b", Addr: closedPort(t, "tcp"), Spec: connectSpec(time.Hour), Observer: b}
	if err := c.Set([]Target{ta, tb}); err != nil {
		t.Fatal(err)
	}
	a.waitCount(t, 1)
	b.waitCount(t, 1)
	if a.results[0].Err != nil || b.results[0].Err == nil {
		t.Fatalf("first results: a %v, b %v; want a to pass and b to fail", a.results[0].Err, b.results[0].Err)
	}

	// The same targets again: the probers keep their schedule (an hour),
	// so no new probe comes.
	if err := c.Set([]Target{ta, tb}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * FirstProbeSpread)
	if a.count() != 1 || b.count() != 1 {
		t.Errorf("an unchanged Set restarted probers: %d and %d results, want 1 each", a.count(), b.count())
	}

	// A changed spec restarts a's prober, which probes again at once; b
	// is dropped.
	ta.Spec.Timeout = 400 * time.Millisecond
	if err := c.Set([]Target{ta}); err != nil {
		t.Fatal(err)
	}
	a.waitCount(t, 2)

	// An invalid spec is reported; the valid targets still run.
	bad := Target{Key: "bad", Addr: up, Spec: Spec{Kind: "http"}, Observer: &recorder{}}
	b2 := &recorder{}
	tb2 := Target{Key: "b2", Addr: up, Spec: connectSpec(time.Hour), Observer: b2}
	if err := c.Set([]Target{ta, bad, tb2}); err == nil {
		t.Error("Set accepted a target of kind http")
	}
	b2.waitCount(t, 1)

	c.Close()
	a.closed.Store(true)
	b.closed.Store(true)
	b2.closed.Store(true)
	time.Sleep(2 * FirstProbeSpread)
	if a.late.Load()+b.late.Load()+b2.late.Load() != 0 {
		t.Error("an Observer was called after Close returned")
	}
	if b.count() != 1 {
		t.Errorf("removed target b was probed %d times, want 1", b.count())
	}
	if err := c.Set([]Target{ta}); err == nil {
		t.Error("Set after Close succeeded")
	}
}

// TestCheckerJitter checks that targets set together are not probed in
// lockstep: their first probes spread over FirstProbeSpread and their
// second ones over half the interval.
func TestCheckerJitter(t *testing.T) {
	up := listen(t)
	c := newTestChecker(t)
	const n, interval = 20, 400 * time.Millisecond
	var recs []*recorder
	var targets []Target
	for i := range n {
		r := &recorder{}
		recs = append(recs, r)
		targets = append(targets, Target{Key: string(rune('a' + i)), Addr: up, Spec: connectSpec(interval), Observer: r})
	}
	start := time.Now()
	if err := c.Set(targets); err != nil {
		t.Fatal(err)
	}
	var first, second []time.Duration
	for _, r := range recs {
		r.waitCount(t, 2)
		r.mu.Lock()
		first = append(first, r.at[0].Sub(start))
		second = append(second, r.at[1].Sub(r.at[0]))
		r.mu.Unlock()
	}
	if spread(first) < FirstProbeSpread/10 {
		t.Errorf("first probes at %v: all within %v of each other", first, spread(first))
	}
	if spread(second) < interval/20 {
		t.Errorf("second probes %v after the first: all within %v of each other", second, spread(second))
	}
}

func spread(ds []time.Duration) time.Duration {
	lo, hi := ds[0], ds[0]
	for _, d := range ds {
		lo, hi = min(lo, d), max(hi, d)
	}
	return hi - lo
}

func listen(t *testing.T) netip.AddrPort {
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
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestCheckerLocalShortageIsInconclusive probes a listening backend while
// every dial fails with EMFILE, as when this host is out of descriptors:
// those probes must not reach the Observer (which would count them toward
// fall and mark a healthy backend down), and one warning covers the run of
// them. Once sockets open again, results flow as before.
func TestCheckerLocalShortageIsInconclusive(t *testing.T) {
	up := listen(t)
	var logs bytes.Buffer // hclog serializes its writes; read after Close
	c := NewChecker(hclog.New(&hclog.LoggerOptions{Output: &logs}))
	t.Cleanup(c.Close)
	var short atomic.Bool
	short.Store(true)
	var shortDials atomic.Int32
	c.dial = func(ctx context.Context, network, address string) (net.Conn, error) {
		if short.Load() {
			shortDials.Add(1)
			return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("socket", syscall.EMFILE)}
		}
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	}
	rec := &recorder{}
	spec := Spec{Kind: Connect, Network: "tcp", Interval: 10 * time.Millisecond, Timeout: 10 * time.Millisecond, Rise: 1, Fall: 1}
	if err := c.Set([]Target{{Key: "up", Addr: up, Spec: spec, Observer: rec}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for shortDials.Load() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("%d probes in 5s, want 5", shortDials.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := rec.count(); n != 0 {
		rec.mu.Lock()
		t.Errorf("%d probes that failed with EMFILE reached the Observer as results of the backend (first: %v)", n, rec.results[0].Err)
		rec.mu.Unlock()
	}
	short.Store(false)
	rec.waitCount(t, 1)
	c.Close()
	if err := rec.results[len(rec.results)-1].Err; err != nil {
		t.Errorf("probe once sockets open again: %v", err)
	}
	if n := strings.Count(logs.String(), "health probe inconclusive"); n != 1 {
		t.Errorf("%d warnings for a run of %d inconclusive probes, want 1:\n%s", n, shortDials.Load(), logs.String())
	}
}

// slowObserver takes 100 ms over each result and says whether a call is
// under way.
type slowObserver struct {
	entered chan struct{} // gets a value as each call starts, while it has room
	busy    atomic.Bool
	calls   atomic.Int32
}

func (o *slowObserver) Observe(Result) {
	o.busy.Store(true)
	o.calls.Add(1)
	select {
	case o.entered <- struct{}{}:
	default:
	}
	time.Sleep(100 * time.Millisecond)
	o.busy.Store(false)
}

// TestCheckerSetWaitsForStoppedProbers stops a target while its Observer
// is handling a result: Set returns only after that call, and no call
// comes after it. Its owner relies on this to turn checks off (every
// backend forced up) without a late result taking a backend down.
func TestCheckerSetWaitsForStoppedProbers(t *testing.T) {
	c := newTestChecker(t)
	obs := &slowObserver{entered: make(chan struct{}, 1)}
	spec := connectSpec(10 * time.Millisecond)
	if err := c.Set([]Target{{Key: "up", Addr: listen(t), Spec: spec, Observer: obs}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-obs.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no probe result in 5s")
	}
	if err := c.Set(nil); err != nil {
		t.Fatal(err)
	}
	if obs.busy.Load() {
		t.Fatal("Set(nil) returned while the removed target's Observer was still running")
	}
	n := obs.calls.Load()
	time.Sleep(5 * spec.Interval)
	if got := obs.calls.Load(); got != n {
		t.Errorf("%d Observer calls after Set(nil) returned", got-n)
	}
}
