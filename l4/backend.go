package l4

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Backend is the runtime state of one backend address of one service. It
// outlives configs: a reload that keeps an address keeps its *Backend, so
// counters and open connections carry over.
type Backend struct {
	addr netip.AddrPort

	active      atomic.Int64  // open proxied connections
	total       atomic.Uint64 // proxied connections ever opened
	dialFailed  atomic.Uint64 // connect attempts that failed or timed out
	bytesToBack atomic.Uint64 // bytes from clients to this backend
	bytesToCli  atomic.Uint64 // bytes from this backend to clients
	lastDialLog atomic.Int64  // monotonicNow of the last dial failure log line
	connectTime latencyHistogram

	// Drain state, guarded by the owning Service's mu: drainTimer is
	// non-nil while the backend drains.
	drainTimer    *time.Timer
	drainDeadline time.Time

	health backendHealth // see health.go

	mu sync.Mutex // guards conns and retired
	// conns links the open connections so a drain or shutdown can close
	// them. An intrusive list: linking and unlinking allocate nothing.
	conns proxyConnList
	// retired is set once the Service has let go of the backend (removed
	// and drained, or removed with nothing open). It never routes again:
	// an address that comes back gets a new Backend.
	retired bool
	// refuseNew: see setRefuseNew.
	refuseNew bool

	udp udpBackend // open UDP flows and datagram counters: udp.go

}

func newBackend(addr netip.AddrPort) *Backend {
	return &Backend{addr: addr}
}

// Addr is the backend's address.
func (b *Backend) Addr() netip.AddrPort { return b.addr }

// BackendStats is a point-in-time copy of a backend's counters.
type BackendStats struct {
	Active      int64
	Total       uint64
	DialFailed  uint64
	BytesToBack uint64
	BytesToCli  uint64
}

// Stats reads the backend's counters.
func (b *Backend) Stats() BackendStats {
	return BackendStats{
		Active:      b.active.Load(),
		Total:       b.total.Load(),
		DialFailed:  b.dialFailed.Load(),
		BytesToBack: b.bytesToBack.Load(),
		BytesToCli:  b.bytesToCli.Load(),
	}
}

// track registers c, which connect has already counted in active, and
// reports false, registering nothing, when the backend was retired (or,
// at weight 0, finished its drain) while c was connecting: no drain would
// ever reach c.
func (b *Backend) track(c *proxyConn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.retired || b.refuseNew {
		return false
	}
	b.total.Add(1)
	b.conns.pushBack(c)
	return true
}

// retireIfIdle retires the backend if no connection is registered, and
// reports whether it did.
func (b *Backend) retireIfIdle() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conns.head != nil {
		return false
	}
	b.retired = true
	return true
}

// refusesNew reports whether a connection or flow that chose the backend
// from an older route must start over on the current one.
func (b *Backend) refusesNew() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.retired || b.refuseNew
}

// setRefuseNew marks a configured backend with weight 0 whose drain is over
// (or had nothing to drain): connections that picked it from an older
// route start over rather than escape the drain. Cleared when its weight
// comes back.
func (b *Backend) setRefuseNew(refuse bool) {
	b.mu.Lock()
	b.refuseNew = refuse
	b.mu.Unlock()
}

// retire closes every open connection and flow to a removed backend and
// makes sure none registers later.
func (b *Backend) retire() {
	b.mu.Lock()
	b.retired = true
	b.mu.Unlock()
	b.closeConns()
}

func (b *Backend) untrack(c *proxyConn) {
	b.mu.Lock()
	b.conns.remove(c)
	b.mu.Unlock()
	b.active.Add(-1)
}

// closeConns aborts every open connection and UDP flow to the backend.
func (b *Backend) closeConns() {
	b.udp.closeFlows()
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := b.conns.head; c != nil; c = c.next {
		c.forced.Store(true)
		c.abort()
	}
}

// proxyConnList is a doubly linked list threaded through proxyConn.
type proxyConnList struct {
	head, tail *proxyConn
}

func (l *proxyConnList) pushBack(c *proxyConn) {
	c.prev, c.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = c
	} else {
		l.head = c
	}
	l.tail = c
}

func (l *proxyConnList) remove(c *proxyConn) {
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		l.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	} else {
		l.tail = c.prev
	}
	c.prev, c.next = nil, nil
}

// clockStart anchors the monotonic clock that idle tracking reads: an
// int64 offset from it fits an atomic, where a time.Time does not.
var clockStart = time.Now()

func monotonicNow() int64 { return int64(time.Since(clockStart)) }
