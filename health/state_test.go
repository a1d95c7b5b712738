package health

import (
	"strings"
	"sync"
	"testing"
)

func TestNext(t *testing.T) {
	const rise, fall = 2, 3
	tests := []struct {
		name string
		from Status
		ok   bool
		want Status
	}{
		{"unknown: first success goes up", Status{Unknown, 0}, true, Status{Up, 0}},
		{"unknown: success after failures goes up", Status{Unknown, 2}, true, Status{Up, 0}},
		{"unknown: failure counts", Status{Unknown, 0}, false, Status{Unknown, 1}},
		{"unknown: fall-th failure goes down", Status{Unknown, 2}, false, Status{Down, 0}},
		{"up: success stays", Status{Up, 0}, true, Status{Up, 0}},
		{"up: success resets failures", Status{Up, 2}, true, Status{Up, 0}},
		{"up: failure counts", Status{Up, 0}, false, Status{Up, 1}},
		{"up: failure before fall stays up", Status{Up, 1}, false, Status{Up, 2}},
		{"up: fall-th failure goes down", Status{Up, 2}, false, Status{Down, 0}},
		{"down: failure stays", Status{Down, 0}, false, Status{Down, 0}},
		{"down: failure resets successes", Status{Down, 1}, false, Status{Down, 0}},
		{"down: success counts", Status{Down, 0}, true, Status{Down, 1}},
		{"down: rise-th success goes up", Status{Down, 1}, true, Status{Up, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Next(tt.from, tt.ok, rise, fall); got != tt.want {
				t.Errorf("Next(%+v, %v, rise %d, fall %d) = %+v, want %+v", tt.from, tt.ok, rise, fall, got, tt.want)
			}
		})
	}
}

func TestNextRiseFallOne(t *testing.T) {
	for _, n := range []int{1, 0, -3} { // below 1 counts as 1
		if got := Next(Status{Up, 0}, false, n, n); got != (Status{Down, 0}) {
			t.Errorf("fall %d: up + failure = %+v, want down", n, got)
		}
		if got := Next(Status{Down, 0}, true, n, n); got != (Status{Up, 0}) {
			t.Errorf("rise %d: down + success = %+v, want up", n, got)
		}
	}
}

// TestNextSequences runs whole result sequences: the number of transitions
// is what rise and fall allow, which is what keeps a flapping backend from
// churning the routing table.
func TestNextSequences(t *testing.T) {
	tests := []struct {
		name       string
		rise, fall int
		results    string // '+' success, '-' failure
		states     string // state after each result: U up, D down, ? unknown
	}{
		{"new backend up at once", 2, 3, "+", "U"},
		{"new backend never answers", 2, 3, "---+-+", "??DDDD"},
		{"alternating never moves an up backend", 2, 3, "-+-+-+-+", "UUUUUUUU"},
		{"two failures in a row are not three", 2, 3, "--+--+", "UUUUUU"},
		// Unlike HAProxy's counter (one failure taken back per success),
		// as the README tells operators coming from HAProxy.
		{"failing 2 probes of every 3 stays up", 2, 3, "--+--+--+--+--+", "UUUUUUUUUUUUUUU"},
		{"down then up", 2, 3, "---++", "UUDDU"},
		{"alternating never moves a down backend", 2, 3, "---+-+-+-", "UUDDDDDDD"},
		{"rise 1 fall 1 follows every result", 1, 1, "-+-+", "DUDU"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := Status{State: Up}
			if tt.name[:3] == "new" {
				s = Status{State: Unknown}
			}
			var got strings.Builder
			for _, r := range tt.results {
				s = Next(s, r == '+', tt.rise, tt.fall)
				got.WriteByte(map[State]byte{Up: 'U', Down: 'D', Unknown: '?'}[s.State])
			}
			if got.String() != tt.states {
				t.Errorf("results %s with rise %d fall %d: states %s, want %s", tt.results, tt.rise, tt.fall, got.String(), tt.states)
			}
		})
	}
}

func TestTracker(t *testing.T) {
	var tr Tracker
	if tr.State() != Unknown {
		t.Fatalf("zero Tracker is %v, want unknown", tr.State())
	}
	if _, changed := tr.Observe(false, 2, 2, "connection refused"); changed {
		t.Fatal("one failure of fall 2 changed the state")
	}
	got, changed := tr.Observe(false, 2, 2, "connection refused")
	if !changed || got.From != Unknown || got.To != Down || !strings.Contains(got.Reason, "2 consecutive probes failed, last: connection refused") {
		t.Fatalf("second failure: %+v changed=%v; want unknown -> down naming the last failure", got, changed)
	}
	tr.Observe(true, 2, 2, "ok")
	got, changed = tr.Observe(true, 2, 2, "ok")
	if !changed || got.To != Up || got.Reason != "2 consecutive probes succeeded" {
		t.Fatalf("second success: %+v changed=%v; want down -> up", got, changed)
	}
	got, changed = tr.Force(Down, "passive: 3 connect failures")
	if !changed || got.From != Up || got.To != Down || tr.State() != Down {
		t.Fatalf("Force(Down): %+v changed=%v state %v", got, changed, tr.State())
	}
	if _, changed := tr.Force(Down, "again"); changed {
		t.Error("Force to the current state reported a change")
	}
	// After a forced down, rise successes are needed again.
	if _, changed := tr.Observe(true, 2, 2, "ok"); changed {
		t.Error("one success after a forced down went up; rise is 2")
	}
	// The forced mark-down is the last failure, not the older probe's.
	snap := tr.Snapshot()
	if snap.Status != (Status{Down, 1}) || snap.LastFailure != "passive: 3 connect failures" || len(snap.History) != 3 {
		t.Errorf("snapshot %+v", snap)
	}
	tr.Observe(false, 2, 2, "timed out")
	if got := tr.Snapshot().LastFailure; got != "timed out" {
		t.Errorf("last failure %q after a failed probe, want that probe's", got)
	}
	for range 2 * historySize {
		tr.Force(Up, "x")
		tr.Force(Down, "y")
	}
	if n := len(tr.Snapshot().History); n != historySize {
		t.Errorf("history holds %d transitions, want the last %d", n, historySize)
	}
}

func TestTrackerConcurrent(t *testing.T) {
	var tr Tracker
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 1000 {
				if i%2 == 0 {
					tr.Observe(j%3 != 0, 2, 3, "r")
				} else {
					tr.Force(Down, "passive")
					_ = tr.State()
				}
			}
		})
	}
	wg.Wait()
	if s := tr.Snapshot().Status.State; s != tr.State() {
		t.Errorf("atomic state %v disagrees with status %v", tr.State(), s)
	}
}

// TestTrackerSetInitial checks that SetInitial sets only a tracker still
// unknown, and records no transition.
func TestTrackerSetInitial(t *testing.T) {
	var tr Tracker
	if !tr.SetInitial(Up) || tr.State() != Up {
		t.Fatalf("SetInitial(Up) on an unknown tracker: %v", tr.State())
	}
	if snap := tr.Snapshot(); len(snap.History) != 0 || snap.WentUp != 0 {
		t.Errorf("SetInitial recorded a transition: %+v", snap)
	}
	tr.Force(Down, "passive")
	if tr.SetInitial(Up) || tr.State() != Down {
		t.Errorf("SetInitial changed a tracker that had left unknown: %v", tr.State())
	}
}
