// Package health decides whether backends can take traffic: probers that
// check a backend (TCP connect, or send a request and expect a reply over
// TCP or UDP), a Checker that runs one prober per backend, and the rise/fall
// logic that turns probe results into up/down states without flapping.
//
// The package knows nothing about services or routing tables. Its user owns a
// Tracker per backend, gives the Checker one Target per backend with an
// Observer that feeds results to that Tracker, and rebuilds its routing when
// a Tracker changes state:
//
//	c := health.NewChecker(logger)
//	defer c.Close()
//	c.Set([]health.Target{{Key: "pg 10.0.0.1:5432", Addr: addr, Spec: spec, Observer: obs}})
//
//	// in obs.Observe(res):
//	if tr, changed := tracker.Observe(res.Err == nil, spec.Rise, spec.Fall, res.Detail()); changed {
//		log.Info("backend health changed", "from", tr.From, "to", tr.To, "reason", tr.Reason)
//	}
//
// Failures seen elsewhere (the data path's connect errors) go to the same
// Tracker through Force, so that active and passive checks share one state.
package health

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// State is a backend's health.
type State uint32

const (
	// Unknown is the state of a backend that has not been probed yet. It
	// takes no traffic.
	Unknown State = iota
	Up
	Down
)

func (s State) String() string {
	switch s {
	case Unknown:
		return "unknown"
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return fmt.Sprintf("State(%d)", uint32(s))
}

// Status is the input and output of the rise/fall logic: a state and how
// many consecutive probe results so far point away from it (failures while
// Up or Unknown, successes while Down).
type Status struct {
	State  State
	Streak int
}

// Next is the rise/fall logic, a pure function of the current status and
// one probe result:
//
//   - Up goes Down after fall consecutive failures; a success resets the
//     count.
//   - Down goes Up after rise consecutive successes; a failure resets the
//     count.
//   - Unknown goes Up at the first success (a new backend takes traffic as
//     soon as it is seen to answer) and Down after fall consecutive
//     failures.
//
// Counting in a row is Envoy's and nginx's way. HAProxy's counter instead
// takes back one failure per success, which brings down a backend failing
// 2 probes of 3; this one stays up (the README says so to operators).
//
// rise and fall below 1 count as 1.
func Next(s Status, ok bool, rise, fall int) Status {
	rise, fall = max(rise, 1), max(fall, 1)
	switch s.State {
	case Up, Unknown:
		if ok {
			return Status{State: Up}
		}
		if s.Streak+1 >= fall {
			return Status{State: Down}
		}
		return Status{State: s.State, Streak: s.Streak + 1}
	default: // Down
		if !ok {
			return Status{State: Down}
		}
		if s.Streak+1 >= rise {
			return Status{State: Up}
		}
		return Status{State: Down, Streak: s.Streak + 1}
	}
}

// Transition is one change of a backend's state.
type Transition struct {
	From, To State
	Reason   string
	At       time.Time
}

// historySize is how many transitions a Tracker keeps for status views:
// enough to see a flap pattern, small enough to copy on every read.
const historySize = 8

// Tracker is the health of one backend, shared by its prober and the data
// path: Observe feeds active probe results, Force sets the state from
// elsewhere (passive detection, checks turned off). The zero Tracker is
// Unknown. Safe for concurrent use; State is a single atomic load, cheap
// enough for the data path.
type Tracker struct {
	state atomic.Uint32 // status.State, readable without mu

	mu     sync.Mutex // guards status, lastFailure and history
	status Status
	// lastFailure is why the backend last failed: the detail of the most
	// recent failed probe, or the reason of a forced mark-down (passive
	// detection) if that came later. The reason a Down transition gives is
	// the failure that tipped it, and a status view shows why a backend
	// stays down.
	lastFailure string
	history     []Transition // oldest first, at most historySize
	// wentUp and wentDown count every transition to Up and to Down, for
	// metrics: history forgets, counters must not.
	wentUp, wentDown uint64
}

// State is the current state.
func (t *Tracker) State() State { return State(t.state.Load()) }

// Observe applies one probe result with the given rise and fall (passed
// per call because a reload may change them while the state carries on).
// detail describes the result ("connection refused", "reply matched"). It
// returns the transition and true when the state changed.
func (t *Tracker) Observe(ok bool, rise, fall int, detail string) (Transition, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !ok {
		t.lastFailure = detail
	}
	next := Next(t.status, ok, rise, fall)
	from := t.status.State
	t.status = next
	if next.State == from {
		return Transition{}, false
	}
	var reason string
	switch {
	case next.State == Up && from == Unknown:
		reason = "first probe succeeded: " + detail
	case next.State == Up:
		reason = fmt.Sprintf("%d consecutive probes succeeded", max(rise, 1))
	default:
		reason = fmt.Sprintf("%d consecutive probes failed, last: %s", max(fall, 1), detail)
	}
	return t.record(from, next.State, reason), true
}

// Force sets the state to s, with an empty streak, and returns the
// transition and true if that changed it. A change to Down makes reason
// the last failure, so that status views show it rather than an older
// probe's.
func (t *Tracker) Force(s State, reason string) (Transition, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	from := t.status.State
	t.status = Status{State: s}
	if from == s {
		return Transition{}, false
	}
	if s == Down {
		t.lastFailure = reason
	}
	return t.record(from, s, reason), true
}

// SetInitial sets a tracker that is still Unknown to s, with an empty
// streak, without recording a transition, and reports whether it did. A
// backend of a service without checks is up by assumption: no change was
// seen, so none is counted or shown.
func (t *Tracker) SetInitial(s State) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status.State != Unknown {
		return false
	}
	t.status = Status{State: s}
	t.state.Store(uint32(s))
	return true
}

// record stores a transition; t.mu must be held.
func (t *Tracker) record(from, to State, reason string) Transition {
	tr := Transition{From: from, To: to, Reason: reason, At: time.Now()}
	t.state.Store(uint32(to))
	switch to {
	case Up:
		t.wentUp++
	case Down:
		t.wentDown++
	}
	if len(t.history) == historySize {
		copy(t.history, t.history[1:])
		t.history = t.history[:historySize-1]
	}
	t.history = append(t.history, tr)
	return tr
}

// Probed reports whether a probe result or a forced state has reached the
// tracker: it is no longer Unknown, or it counts failures toward Down.
func (t *Tracker) Probed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.status.State != Unknown || t.status.Streak > 0
}

// Snapshot is a Tracker's state for status views.
type Snapshot struct {
	Status Status
	// LastFailure is the last failed probe's detail, or the reason of a
	// later forced mark-down.
	LastFailure string
	// History holds the latest transitions, oldest first.
	History []Transition
	// WentUp and WentDown count all transitions to Up and to Down.
	WentUp, WentDown uint64
}

// Snapshot copies the tracker's state.
func (t *Tracker) Snapshot() Snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()
	return Snapshot{
		Status:      t.status,
		LastFailure: t.lastFailure,
		History:     append([]Transition(nil), t.history...),
		WentUp:      t.wentUp,
		WentDown:    t.wentDown,
	}
}
