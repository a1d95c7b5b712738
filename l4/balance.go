package l4

import (
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/l4lb/l4lb/config"
)

// member is one backend as a balancer sees it.
type member struct {
	key    string        // stable identity: the backend address, netip.AddrPort.String()
	weight int           // > 0; zero-weight backends are never passed to a balancer
	active *atomic.Int64 // open connections to this backend (read by least_conn; never nil)
}

// balancer picks backends. It is built once from members on the control side and
// then read concurrently by many goroutines without locks (atomic counters are fine).
type balancer interface {
	// pick returns an index into the members slice the balancer was built from:
	// the preferred backend for key that is not listed in tried, or -1 when every
	// member is in tried (or there are no members). pick(key, nil) is the first choice;
	// after a failed connect the caller calls pick(key, []int{first}) and so on, so
	// for maglev the retries follow "the next backends in that key's table order"
	// (walk the table forward from the key's slot, skipping tried ones, wrapping around).
	pick(key uint64, tried []int) int
}

// newBalancer builds the balancer kind names from members. The balancer keeps
// no reference to the members slice itself (least_conn keeps the active
// counters), so the caller may reuse it. An unknown kind panics: the config
// package admits only the three constants, so any other value is a bug here,
// not a user error.
func newBalancer(kind config.Balance, members []member) balancer {
	switch kind {
	case config.Maglev:
		return newMaglev(members, DefaultMaglevSize)
	case config.RoundRobin:
		return newRoundRobin(members)
	case config.LeastConn:
		return newLeastConn(members)
	}
	panic(fmt.Sprintf("l4: unknown balance %q", kind))
}

// rrMaxPeriod bounds the round-robin sequence: 64 Ki int32 entries, 256 KiB per
// service, the same order as a Maglev table.
const rrMaxPeriod = 1 << 16

// roundRobin is smooth weighted round robin (nginx's algorithm): with weights
// 5, 1, 1 it sends a b a a a c a rather than a a a a a b c, so a heavy backend
// never receives a burst. The whole period is computed at build time so that
// pick is one atomic add and one array read, with no lock on the data path.
//
// The period is sum(weights)/gcd(weights) entries. When that exceeds
// rrMaxPeriod the weights are scaled down to fit (each stays >= 1), so shares
// are then exact to about 1/rrMaxPeriod of the total weight plus rounding;
// the sequence never holds more than rrMaxPeriod+len(members) entries.
//
// nginx's step costs O(members); run over every member it would make the build
// O(period × members), a quarter of a second for 1000 backends of varied
// weight. Members of equal weight are interchangeable, so the build runs
// nginx over weight classes (a class weighs its weight times its size) and
// hands each class's turns to its members in rotation: O(period × distinct
// weights), with each member still getting exactly its weight per period and
// at evenly spaced turns of its class.
type roundRobin struct {
	next atomic.Uint64 // picks so far; the position in seq is next % len(seq)
	// The read-only fields sit on another cache line than next, which every
	// pick on every core writes.
	_   [56]byte
	seq []int32 // member indices
	n   int
}

var _ balancer = (*roundRobin)(nil)

func newRoundRobin(members []member) *roundRobin {
	rr := &roundRobin{n: len(members)}
	if len(members) == 0 {
		return rr
	}
	weights := make([]int64, len(members))
	for i, mb := range members {
		if mb.weight < 1 {
			panic(fmt.Sprintf("l4: round_robin member %s has weight %d", mb.key, mb.weight))
		}
		weights[i] = int64(mb.weight)
	}
	total := reduceWeights(weights)
	if total > rrMaxPeriod {
		for i, w := range weights {
			weights[i] = max(1, w*rrMaxPeriod/total)
		}
		total = reduceWeights(weights)
	}

	// Classes in order of first appearance, members in index order.
	type class struct {
		weight  int64   // the members' weight times their number
		current int64   // nginx's current weight
		members []int32 // in the order they take the class's turns
		turn    int     // next member, index into members
	}
	var classes []class
	classOf := make(map[int64]int)
	for i, w := range weights {
		c, ok := classOf[w]
		if !ok {
			c = len(classes)
			classOf[w] = c
			classes = append(classes, class{})
		}
		classes[c].weight += w
		classes[c].members = append(classes[c].members, int32(i))
	}

	// nginx: every class gains its weight, the one with the most current
	// weight (the first on ties) is chosen and pays the total. After total
	// steps every current weight is back at zero and each class was chosen
	// exactly its weight times, so the sequence repeats with period total.
	seq := make([]int32, total)
	for t := range seq {
		best := 0
		for c := range classes {
			classes[c].current += classes[c].weight
			if classes[c].current > classes[best].current {
				best = c
			}
		}
		b := &classes[best]
		b.current -= total
		seq[t] = b.members[b.turn]
		b.turn++
		if b.turn == len(b.members) {
			b.turn = 0
		}
	}
	rr.seq = seq
	return rr
}

// pick ignores key: round robin is not sticky.
//
// A retry draws fresh positions until one holds an untried member, so retries
// too are shared by weight among the untried. Walking on from the first
// position instead would favour whoever follows the failed backend's runs in
// the sequence: with weights 5, 1, 1 and the first down, 4 of 7 retries would
// go to the third and 3 to the second. After
// rrMaxRedraws the draw gives way to that walk, which one lap always ends:
// every member has weight >= 1 and so appears in seq.
func (rr *roundRobin) pick(_ uint64, tried []int) int {
	if rr.n == 0 {
		return -1
	}
	period := uint64(len(rr.seq))
	pos := int((rr.next.Add(1) - 1) % period)
	if len(tried) == 0 {
		return int(rr.seq[pos])
	}
	if allTried(rr.n, tried) {
		return -1
	}
	for range rrMaxRedraws {
		if i := int(rr.seq[pos]); !contains(tried, i) {
			return i
		}
		pos = int((rr.next.Add(1) - 1) % period)
	}
	for range len(rr.seq) {
		if i := int(rr.seq[pos]); !contains(tried, i) {
			return i
		}
		pos++
		if pos == len(rr.seq) {
			pos = 0
		}
	}
	return -1
}

// rrMaxRedraws bounds the atomic adds of one retry: the draw only needs many
// when the tried backends hold most of the weight, where the walk is cheaper.
const rrMaxRedraws = 16

// leastConn sends a connection to the member with the fewest open connections
// per unit of weight. The comparison a/w < b/v is done as a·v < b·w in int64,
// exact and without floats (counts and weights are far below 2^31).
//
// Equal loads are frequent (idle service, short connections) and always
// taking the first would pile every burst onto one backend, so each pick
// starts its scan at the next member in turn and keeps the first of equals.
type leastConn struct {
	next atomic.Uint64 // picks so far; the scan starts at next % len(members)
	_    [56]byte      // keeps next off the cache line of the read-only slice
	// members holds copies: weight and the shared active counter are all
	// least_conn reads.
	members []member
}

var _ balancer = (*leastConn)(nil)

func newLeastConn(members []member) *leastConn {
	for _, mb := range members {
		if mb.weight < 1 {
			panic(fmt.Sprintf("l4: least_conn member %s has weight %d", mb.key, mb.weight))
		}
	}
	return &leastConn{members: slices.Clone(members)}
}

// pick ignores key: least_conn follows load, not clients.
func (lc *leastConn) pick(_ uint64, tried []int) int {
	n := len(lc.members)
	if n == 0 {
		return -1
	}
	i := int((lc.next.Add(1) - 1) % uint64(n))
	best := -1
	var bestActive, bestWeight int64
	for range n {
		if !contains(tried, i) {
			mb := &lc.members[i]
			a, w := mb.active.Load(), int64(mb.weight)
			if best < 0 || a*bestWeight < bestActive*w {
				best, bestActive, bestWeight = i, a, w
			}
		}
		i++
		if i == n {
			i = 0
		}
	}
	return best
}

// contains reports whether tried holds i. Linear: tried holds the few
// backends whose connect already failed.
func contains(tried []int, i int) bool {
	for _, t := range tried {
		if t == i {
			return true
		}
	}
	return false
}

// allTried reports whether tried covers every index in [0, n). It settles the
// common case by length first, so a retry pays nothing for it.
func allTried(n int, tried []int) bool {
	if len(tried) < n {
		return false
	}
	for i := range n {
		if !contains(tried, i) {
			return false
		}
	}
	return true
}

// reduceWeights divides weights by their greatest common divisor, in place,
// and returns their new sum: weights 100, 200 give the period 3, not 300.
func reduceWeights(weights []int64) int64 {
	g := int64(0)
	for _, w := range weights {
		g = gcd(g, w)
	}
	total := int64(0)
	for i := range weights {
		weights[i] /= g
		total += weights[i]
	}
	return total
}

func gcd(a, b int64) int64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
