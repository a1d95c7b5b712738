package l4

import (
	"cmp"
	"container/heap"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/listener"
)

// The TCP data plane runs on event loops of its own, one per core, rather
// than on two goroutines per connection parked on Go's netpoller. Each
// loop owns an epoll set, edge-triggered, with both sockets of each of its
// connections in it, and moves bytes from the events it reads. Compared
// with a goroutine per direction, this saves per message the read that
// only finds EAGAIN (the epoll event says whether a FIN came with the
// data, which Go's netpoller does not pass on), and the scheduler's
// wake-ups and hand-offs; per connection, the two goroutines, their
// stacks (most of what an idle connection cost), and net's system calls
// (getsockname, getpeername, epoll_ctl and friends). docs/performance.md
// has the measurements.
//
// A loop is a goroutine, not a locked thread: its epoll descriptor is
// itself registered with Go's netpoller (an epoll set is pollable), so an
// idle loop parks like any goroutine, and its timers (connect, idle, PROXY
// header) are the read deadline of that descriptor. Each loop accepts from
// listening sockets of its own (acceptor), so a new connection is started
// by the thread that accepted it. Other goroutines reach a loop only
// through its requests: the control side hands it listening sockets and
// takes them back, and aborts connections (drains, shutdown, health).
// Everything else about a connection is touched by its loop alone, so the
// data path takes no lock.
type eventLoop struct {
	epfd int
	// file is epfd on Go's netpoller; rc parks the loop until epfd has
	// events or the next timer is due.
	file *os.File
	rc   syscall.RawConn
	// wakeFD is an eventfd in the epoll set: a write to it wakes the loop
	// to read its requests. It is never read: edge-triggered, each write is
	// a new event however high the counter.
	wakeFD int
	pipes  *pipePool

	mu sync.Mutex // guards aborts, starting, stopping and wakePending
	// aborts are connections the control side ends.
	aborts []*proxyConn
	// starting and stopping are listening sockets the control side hands
	// to the loop or takes back.
	starting, stopping []*acceptor
	// wakePending: a wake-up is written and the loop has not yet taken
	// its requests, so another request need not write again.
	wakePending bool

	// Everything below belongs to the loop's goroutine.
	events [128]unix.EpollEvent
	// conns maps the slot in an epoll event's data to its connection;
	// acceptors, a slot below wakeSlot to its listening socket.
	conns     []*proxyConn
	acceptors []*acceptor
	// acceptRetry is the earliest retryAt of the stopped acceptors.
	acceptRetry int64
	// moreAccepts are acceptors that took acceptBatch clients and left
	// more in their queue: the next round takes their next batch. An
	// edge-triggered socket gives no new event for clients already queued.
	moreAccepts, takenMore []*acceptor
	// peerAddr is what accept4 writes the client's address into.
	peerAddr unix.RawSockaddrAny
	// freeSlots can be reused; freedNow were freed in the current batch
	// of events, which may still name them, and join freeSlots after it.
	freeSlots, freedNow []int32
	// takenAborts is aborts swapped out, kept to reuse its array.
	takenAborts []*proxyConn
	timers      timerHeap
	// armed is the timer deadline set on file (monotonicNow units), 0 for
	// none.
	armed int64
	// now is monotonicNow when the current batch of events was read.
	now int64
	// scratch is the buffer a read made at once goes into (without a
	// ring, or with the arena full); only bytes a destination does not
	// take at once are copied to a buffer of the connection's own.
	scratch *copyBuf
	// The round of reads and writes (round.go): ring makes them with one
	// system call each way; nil where io_uring is not available, and then
	// each read and write is made at once.
	ring *ioRing
	// ringErr is why the loop has no ring, when it was asked for one.
	ringErr error
	// recvs and sends are the round's, made together by flushRound. Their
	// bytes are in arena[:arenaUsed]; reads go to scratch (and are written
	// at once) when it has no room for one more.
	recvs, sends opQueue
	touched      []*proxyConn
	arena        []byte
	arenaUsed    int
	// resetting are sockets of ended connections that wait for their
	// peers to take what l4lb passed on before the reset that follows
	// (closeWithReset); resetCheck is when they are looked at next, 0
	// while none waits.
	resetting  []pendingReset
	resetCheck int64
	// header is the buffer PROXY headers are peeked into.
	header [proxyHeaderMax]byte
	poll   func(fd uintptr) bool
}

// Epoll event data: the connection's slot in Fd, and in Pad which socket
// (bit 0: 0 client, 1 backend) and, for the backend, which dial (the
// rest): a backend socket closed after a failed connect can still have an
// event in the batch being handled, which must not reach its successor.
const wakeSlot = -1

// loops is the process's set of event loops, started on first use.
var loops = sync.OnceValue(func() *loopSet {
	n := runtime.GOMAXPROCS(0)
	set := &loopSet{loops: make([]*eventLoop, n)}
	pipes := newPipePool()
	for i := range set.loops {
		l, err := newEventLoop(pipes)
		if err != nil {
			// epoll_create1 and eventfd fail only without descriptors or
			// memory at start-up; nothing could be served.
			panic(fmt.Sprintf("l4lb: cannot start the TCP event loops: %v", err))
		}
		set.loops[i] = l
		set.ringErr = cmp.Or(set.ringErr, l.ringErr)
		go l.run()
	}
	return set
})

type loopSet struct {
	loops []*eventLoop
	// next is the loop, modulo len(loops), of the next service's first
	// socket (reserve).
	next atomic.Uint32
	// ringErr is why a loop has no io_uring, if one has none.
	ringErr error
}

// reserve returns the index of the first of n loops taken in turn, for a
// new service's n listening sockets: each service starts where the
// previous one ended, so services with fewer sockets than there are
// loops spread over the cores instead of all starting on loop 0 (a
// connection runs on the loop that accepted it).
func (s *loopSet) reserve(n int) int {
	end := s.next.Add(uint32(n))
	return int((end - uint32(n)) % uint32(len(s.loops)))
}

func newEventLoop(pipes *pipePool) (*eventLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	wakeFD, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: wakeSlot}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakeFD, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wakeFD)
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	// Non-blocking, so that os.NewFile puts it on the netpoller.
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		unix.Close(wakeFD)
		return nil, err
	}
	l := &eventLoop{epfd: epfd, file: os.NewFile(uintptr(epfd), "l4lb-event-loop"), wakeFD: wakeFD, pipes: pipes,
		scratch: new(copyBuf)}
	if ioRingWanted {
		if l.ring, l.ringErr = newIORing(ioRingEntries); l.ring != nil {
			l.arena = make([]byte, roundArenaSize)
		}
	}
	if l.rc, err = l.file.SyscallConn(); err != nil {
		return nil, err
	}
	l.poll = l.pollFD
	return l, nil
}

// run is the loop's goroutine. Loops live as long as the process.
func (l *eventLoop) run() {
	for {
		err := l.rc.Read(l.poll)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// A timer is due: clear the deadline (an expired one fails
			// every wait at once); pollFD fires it and arms the next.
			l.armed = 0
			l.file.SetReadDeadline(time.Time{})
			continue
		}
		if err != nil {
			panic(fmt.Sprintf("l4lb: event loop stopped: %v", err))
		}
	}
}

// testHookBeforeTimers, set by tests only, runs on each loop just before
// a round's due timers fire: a test makes a loop fall behind there.
var testHookBeforeTimers atomic.Pointer[func(*eventLoop)]

// postAbort asks the loop to close c, from any goroutine.
func (l *eventLoop) postAbort(c *proxyConn) {
	l.mu.Lock()
	l.aborts = append(l.aborts, c)
	l.unlockAndWake()
}

// unlockAndWake ends a request: it unlocks mu and wakes the loop, unless
// a wake-up is already on its way.
func (l *eventLoop) unlockAndWake() {
	wake := !l.wakePending
	l.wakePending = true
	l.mu.Unlock()
	if wake {
		l.wake()
	}
}

// pollFD is the RawConn.Read callback: it handles every event and timer
// that is ready, then returns false to park until there are more.
func (l *eventLoop) pollFD(uintptr) bool {
	yielded := false
	for {
		n, err := epollWaitNow(l.epfd, l.events[:])
		if err != nil && err != unix.EINTR {
			panic(fmt.Sprintf("l4lb: epoll_wait: %v", err))
		}
		l.now = monotonicNow()
		// The acceptors that stopped at acceptBatch in the last round take
		// their next batch after this round's events: the connections
		// the loop already runs go first.
		more := l.takeMoreAccepts()
		for i := range n {
			ev := &l.events[i]
			switch {
			case ev.Fd == wakeSlot:
				continue // the requests are read below, every round
			case ev.Fd < wakeSlot:
				if a := l.acceptors[acceptorSlot(ev.Fd)]; a != nil {
					a.readable = true
					if a.retryAt == 0 && !a.more {
						// A stopped acceptor waits for its retry time:
						// each new client must not mean another failing
						// accept and another log line. One with more
						// to take is resumed below.
						a.accept()
					}
				}
				continue
			}
			if c := l.conns[ev.Fd]; c != nil {
				c.onEvent(ev.Events, ev.Pad)
			}
		}
		l.resumeAccepts(more)
		l.takeInbox()
		l.flushRound()
		l.freeSlots = append(l.freeSlots, l.freedNow...)
		l.freedNow = l.freedNow[:0]
		if hook := testHookBeforeTimers.Load(); hook != nil {
			(*hook)(l)
		}
		l.fireTimers()
		l.resetSent()
		l.retryAcceptors()
		if n == len(l.events) || len(l.moreAccepts) > 0 {
			continue // more may be waiting
		}
		if n > 0 && !yielded && l.ring == nil {
			// Without io_uring, each message's write wakes its reader
			// (a client, a backend), often on this core. Before going to
			// sleep, let them run: their answers are then usually waiting
			// at the next poll, and the loop goes on without the sleep
			// and wake-up (a context switch each, and an interrupt to
			// this core) that would otherwise come with every message. On
			// redis -k 1 the loops slept 2.8 times as often as HAProxy's
			// threads; with this yield, half as often, for 40% more
			// requests/s. With the ring's rounds it saved 5% of the CPU
			// but raised p99 from 2.1 to 3.6 ms (docs/performance.md).
			yielded = true
			rawYield()
			continue
		}
		break
	}
	l.armTimer()
	return false
}

// postAcceptor hands a listening socket to the loop (stop false), or
// asks the loop to close it (stop true); a.done says when it has.
func (l *eventLoop) postAcceptor(a *acceptor, stop bool) {
	l.mu.Lock()
	if stop {
		l.stopping = append(l.stopping, a)
	} else {
		l.starting = append(l.starting, a)
	}
	l.unlockAndWake()
}

func (l *eventLoop) wake() {
	one := uint64(1)
	unix.RawSyscall(unix.SYS_WRITE, uintptr(l.wakeFD), uintptr(unsafe.Pointer(&one)), 8)
}

func (l *eventLoop) takeInbox() {
	l.mu.Lock()
	if len(l.aborts) == 0 && len(l.starting) == 0 && len(l.stopping) == 0 {
		l.wakePending = false
		l.mu.Unlock()
		return
	}
	l.aborts, l.takenAborts = l.takenAborts[:0], l.aborts
	starting, stopping := l.starting, l.stopping
	l.starting, l.stopping = nil, nil
	l.wakePending = false
	l.mu.Unlock()
	for _, a := range starting {
		l.startAcceptor(a)
	}
	for _, a := range stopping {
		l.stopAcceptor(a)
	}
	for i, c := range l.takenAborts {
		c.finish(errAborted)
		l.takenAborts[i] = nil
	}
}

// epollWaitNow is epoll_wait with a zero timeout, so it never blocks: a
// RawSyscall, for the reasons rawRead gives. It is made as epoll_pwait
// without a signal mask, the same call, which every architecture has
// (arm64 has no epoll_wait).
func epollWaitNow(epfd int, events []unix.EpollEvent) (int, error) {
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// Sockets are registered for input, urgent data, output and the peer's
// FIN at once, edge-triggered: each socket costs one epoll_ctl for its
// life, and its close removes it from the set.
const sockEvents = unix.EPOLLIN | unix.EPOLLPRI | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

func (l *eventLoop) register(fd int, slot int32, tag int32) error {
	ev := unix.EpollEvent{Events: sockEvents, Fd: slot, Pad: tag}
	if err := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

func (l *eventLoop) takeSlot(c *proxyConn) int32 {
	if n := len(l.freeSlots); n > 0 {
		slot := l.freeSlots[n-1]
		l.freeSlots = l.freeSlots[:n-1]
		l.conns[slot] = c
		return slot
	}
	l.conns = append(l.conns, c)
	return int32(len(l.conns) - 1)
}

func (l *eventLoop) releaseSlot(slot int32) {
	l.conns[slot] = nil
	l.freedNow = append(l.freedNow, slot)
}

// Timers: each connection has at most one, its next deadline (connect,
// PROXY header or idle). Idle deadlines are moved lazily: bytes moving
// only record the time, and a timer that fires early is pushed back.

func (l *eventLoop) schedule(c *proxyConn, at int64) {
	c.timerAt = at
	if c.timerIndex >= 0 {
		heap.Fix(&l.timers, c.timerIndex)
		return
	}
	heap.Push(&l.timers, c)
}

func (l *eventLoop) unschedule(c *proxyConn) {
	if c.timerIndex >= 0 {
		heap.Remove(&l.timers, c.timerIndex)
	}
}

func (l *eventLoop) fireTimers() {
	for len(l.timers) > 0 && l.timers[0].timerAt <= l.now {
		c := heap.Pop(&l.timers).(*proxyConn)
		c.onTimer()
	}
}

// armTimer sets the read deadline of the loop's descriptor to its next
// timer, when that changed.
func (l *eventLoop) armTimer() {
	next := earliest(l.acceptRetry, l.resetCheck)
	if len(l.timers) > 0 {
		next = earliest(next, l.timers[0].timerAt)
	}
	if next == l.armed {
		return
	}
	l.armed = next
	if next == 0 {
		l.file.SetReadDeadline(time.Time{})
		return
	}
	l.file.SetReadDeadline(clockStart.Add(time.Duration(next)))
}

// pendingReset is a socket that closeWithReset keeps open until its peer
// has taken what the socket still has to send.
type pendingReset struct {
	fd int
	// queued is what the send queue held when last looked at, progress
	// when it last shrank; giveUp is how long it may stay the same.
	queued, progress, giveUp int64
	// next is when the queue is looked at again, wait the pause before
	// that: resetRecheck while the peer takes bytes, doubling up to
	// resetRecheckMax while it takes none.
	next, wait int64
}

// resetRecheck is how often a socket waiting to be reset looks at its
// send queue while its peer takes bytes: the kernel says nothing when it
// empties (EPOLLOUT comes only after a full buffer), and only connections
// that ended in an error with bytes still on their way wait at all.
const resetRecheck = 10 * time.Millisecond

// resetRecheckMax bounds the pause of a socket whose peer takes nothing:
// it may wait for idle_timeout, and a peer that stopped reading must not
// cost two system calls every resetRecheck for that long.
const resetRecheckMax = time.Second

// closeWithReset closes fd with a reset. A reset discards what the
// socket has still to send: the end of what l4lb passed on before the
// failure, which the peer would lose although its sender saw it taken. So
// with afterSent, a socket whose send queue is not empty leaves the epoll
// set (its connection's slot will serve another) and stays open until the
// queue empties, or has not shrunk for giveUp, and is reset then.
func (l *eventLoop) closeWithReset(fd int, afterSent bool, giveUp time.Duration) {
	if afterSent {
		if queued := unsentTo(fd); queued > 0 {
			var ev unix.EpollEvent
			rawEpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, &ev)
			next := l.now + int64(resetRecheck)
			l.resetCheck = earliest(l.resetCheck, next)
			l.resetting = append(l.resetting, pendingReset{fd: fd, queued: queued, progress: l.now, giveUp: int64(giveUp),
				next: next, wait: int64(resetRecheck)})
			return
		}
	}
	rawResetOnClose(fd)
	rawClose(fd)
}

// unsentTo is how many bytes the socket fd has still to get to its peer:
// its send queue, or 0 once the connection is gone (reset), for which
// SIOCOUTQ goes on counting what the reset dropped.
func unsentTo(fd int) int64 {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil || info.State == tcpClose {
		return 0
	}
	return sendQueued(fd)
}

// resetSent resets the waiting sockets whose peers took everything, or
// stopped taking anything; on the loop.
func (l *eventLoop) resetSent() {
	if len(l.resetting) == 0 || l.resetCheck > l.now {
		return
	}
	kept := l.resetting[:0]
	l.resetCheck = 0
	for _, r := range l.resetting {
		if r.next > l.now {
			kept = append(kept, r)
			l.resetCheck = earliest(l.resetCheck, r.next)
			continue
		}
		if queued := unsentTo(r.fd); queued > 0 {
			if queued < r.queued {
				r.queued, r.progress, r.wait = queued, l.now, int64(resetRecheck)
			} else {
				r.wait = min(2*r.wait, int64(resetRecheckMax))
			}
			if l.now-r.progress < r.giveUp {
				r.next = l.now + r.wait
				kept = append(kept, r)
				l.resetCheck = earliest(l.resetCheck, r.next)
				continue
			}
		}
		rawResetOnClose(r.fd)
		rawClose(r.fd)
	}
	l.resetting = kept
}

// earliest is the earlier of two loop times, 0 standing for none.
func earliest(a, b int64) int64 {
	if a == 0 || b != 0 && b < a {
		return b
	}
	return a
}

// timerHeap is a min-heap of connections by timerAt.
type timerHeap []*proxyConn

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].timerAt < h[j].timerAt }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].timerIndex = i
	h[j].timerIndex = j
}
func (h *timerHeap) Push(x any) {
	c := x.(*proxyConn)
	c.timerIndex = len(*h)
	*h = append(*h, c)
}
func (h *timerHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.timerIndex = -1
	return c
}

// acceptor is one listening socket of a service, run by a loop: the loop
// accepts when epoll says a client waits and starts the client's
// connection on itself, so a new connection costs no goroutine and no
// hand-off between threads. Each SO_REUSEPORT socket of a service goes to
// another loop (Server.serve), so each core accepts from its own queue.
type acceptor struct {
	loop *eventLoop
	fd   int
	// listenFD is fd as it was given, never changed: the control side
	// reads it (ListenSockets) while the loop owns fd.
	listenFD int
	addr     netip.AddrPort
	svc      *Service
	// gate bounds the connections open over all services (limits.go).
	gate *connGate
	slot int32

	readable bool
	// held was accepted while the gate was full, and waits for a slot:
	// at the bound each acceptor holds at most one client, and the rest
	// queue in the kernel. FD is -1 when none is held.
	held listener.Conn
	// retryAt is when an acceptor that stopped (a full gate, or an accept
	// error to back off from) tries again; 0 when it has not stopped.
	retryAt int64
	// more: the acceptor took acceptBatch clients and is on its loop's
	// moreAccepts, for the next round.
	more    bool
	backoff listener.Backoff

	// done is closed once the loop has closed the socket.
	done *sync.WaitGroup
}

// acceptBatch is how many clients an acceptor takes in one round of its
// loop, as HAProxy's tune.maxaccept (64) bounds its listeners: each
// costs an accept, checks and a connect, so a burst of thousands taken in
// one go would stall the connections the loop already runs, and the
// other acceptors of the loop, for as long. The rest wait in the kernel's
// queue for the next round, after the events that came meanwhile.
const acceptBatch = 64

// gateRecheck is how often an acceptor at a full gate looks for a freed
// slot: a loop must not block on the gate, and a check costs one atomic
// add, so polling is cheaper than waking acceptors on each release.
const gateRecheck = 10 * time.Millisecond

// acceptorSlot maps acceptor slots to epoll data below wakeSlot.
func acceptorSlot(slot int32) int32 { return -2 - slot }

// startAcceptor puts a's socket in the loop's epoll set; on the loop.
func (l *eventLoop) startAcceptor(a *acceptor) {
	// Reuse a closed acceptor's slot: reloads that change workers would
	// otherwise grow the table. A stale event in the batch being handled
	// costs the new acceptor one accept that finds EAGAIN, nothing else.
	a.slot = int32(slices.Index(l.acceptors, nil))
	if a.slot < 0 {
		a.slot = int32(len(l.acceptors))
		l.acceptors = append(l.acceptors, a)
	} else {
		l.acceptors[a.slot] = a
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: acceptorSlot(a.slot)}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, a.fd, &ev); err != nil {
		// Only for want of kernel memory: the socket cannot serve.
		a.svc.log.Error("cannot watch a listening socket; it will not accept", "listen", a.addr, "error", err)
		return
	}
	a.readable = true // clients may have queued before the socket joined the set
	a.accept()
}

// stopAcceptor closes a's socket; on the loop.
func (l *eventLoop) stopAcceptor(a *acceptor) {
	if a.fd >= 0 {
		a.takeQueued()
		// Closing fd alone would leave it in the epoll set while another
		// descriptor of the socket is open: the one an upgrade passed to
		// the next l4lb, which keeps accepting from it.
		var ev unix.EpollEvent
		rawEpollCtl(l.epfd, unix.EPOLL_CTL_DEL, a.fd, &ev)
		unix.Close(a.fd)
		a.fd = -1
	}
	if a.held.FD >= 0 {
		// It waited for a slot under max_connections: served past the
		// bound rather than reset, as the queue was. One client per
		// acceptor at most, within the descriptors maxConnectionsFor
		// keeps in reserve.
		if a.gate != nil {
			a.gate.force()
		}
		conn := a.held
		a.held.FD = -1
		if c := a.svc.admitClient(conn, l); c != nil {
			c.begin()
		}
	}
	l.acceptors[a.slot] = nil
	a.retryAt = 0
	a.more = false // resumeAccepts skips it: its fd is closed
	a.done.Done()
}

// takeMoreAccepts returns the acceptors that stopped at acceptBatch, and
// empties the list for this round's; on the loop.
func (l *eventLoop) takeMoreAccepts() []*acceptor {
	if len(l.moreAccepts) == 0 {
		return nil
	}
	more := l.moreAccepts
	l.moreAccepts, l.takenMore = l.takenMore[:0], more
	return more
}

// resumeAccepts has the acceptors of more take their next batch.
func (l *eventLoop) resumeAccepts(more []*acceptor) {
	for i, a := range more {
		more[i] = nil
		if !a.more || a.fd < 0 {
			continue
		}
		a.more = false
		a.accept()
	}
}

// takeQueued takes and serves the clients waiting in the socket's queue,
// before the socket closes: the kernel would reset them, or with
// net.ipv4.tcp_migrate_req move them to another socket of the group,
// which it may fail to do for one that completes its handshake as the
// socket closes. On the loop.
func (a *acceptor) takeQueued() {
	// The queue holds at most the listen backlog (somaxconn).
	for range maxQueuedBatches {
		a.readable, a.more = true, false
		a.acceptUntilStopped()
		if !a.more {
			return
		}
	}
}

// maxQueuedBatches bounds takeQueued: the largest backlog Linux allows
// (somaxconn's cap, 65535) in acceptBatch clients at a time.
const maxQueuedBatches = 65536/acceptBatch + 1

// accept takes clients from the socket until it has none, it has taken
// acceptBatch, the gate is full or accept fails.
func (a *acceptor) accept() {
	a.acceptUntilStopped()
	a.loop.acceptRetry = earliest(a.loop.acceptRetry, a.retryAt)
}

func (a *acceptor) acceptUntilStopped() {
	l := a.loop
	for taken := 0; a.fd >= 0 && (a.readable || a.held.FD >= 0); {
		if a.held.FD < 0 {
			if taken == acceptBatch {
				a.more = true
				l.moreAccepts = append(l.moreAccepts, a)
				return
			}
			taken++
			conn, err := listener.Accept(a.fd, &l.peerAddr)
			switch err {
			case nil:
				a.backoff.Reset()
			case unix.EAGAIN:
				a.readable = false
				return
			case unix.EINTR, unix.ECONNABORTED:
				continue
			default:
				wait := a.backoff.Next()
				a.retryAt = l.now + int64(wait)
				msg, level := "accept failed unexpectedly, backing off", hclog.Error
				if listener.IsTransient(err) {
					msg, level = "accept failed, backing off", hclog.Warn
				}
				a.svc.log.Log(level, msg, "listen", a.addr.String(), "error", os.NewSyscallError("accept4", err), "retry_in", wait.String())
				return
			}
			a.held = conn
		}
		if a.gate != nil && !a.gate.tryAcquire() {
			a.retryAt = l.now + int64(gateRecheck)
			return
		}
		conn := a.held
		a.held = listener.Conn{FD: -1}
		if c := a.svc.admitClient(conn, l); c != nil {
			c.begin()
		}
	}
}

// retryAcceptors runs the stopped acceptors whose retry time has come.
func (l *eventLoop) retryAcceptors() {
	if l.acceptRetry == 0 || l.acceptRetry > l.now {
		return
	}
	l.acceptRetry = 0
	for _, a := range l.acceptors {
		if a == nil || a.retryAt == 0 {
			continue
		}
		if a.retryAt <= l.now {
			a.retryAt = 0
			a.accept()
		}
		l.acceptRetry = earliest(l.acceptRetry, a.retryAt)
	}
}
