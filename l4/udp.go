package l4

import (
	"errors"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/internal/mmsg"
)

// The UDP data path.
//
// A UDP service has one worker per SO_REUSEPORT socket. The kernel hashes
// each datagram's 4-tuple to pick the socket, so a client address:port
// always reaches the same worker, and each worker owns the flows of the
// clients it sees: its flow table and timer wheel are plain maps and lists
// that no other goroutine touches, and the per-datagram path takes no lock.
//
//	client ──datagram──▶ listen socket (worker w) ──flow table──▶ connected socket ──▶ backend
//	client ◀──────────── listen socket (worker w) ◀── flow reader ◀── connected socket ◀── backend
//
// A flow is keyed by the client's address:port. Its first datagram picks a
// backend from the service's route (one atomic load; the same balancer and
// clientKey as TCP, so a Plan predicts it) and opens a UDP socket connected
// to that backend. The socket's reader goroutine sends the backend's
// replies to the client from the worker's listen socket, so they leave from
// the address the client sent to (the listen address must be a specific
// address for that: see the note on wildcard listens in the README).
//
// System calls are the cost of a datagram, so both directions move
// batches (internal/mmsg): a worker takes up to udpBatch datagrams from its
// listen socket with one recvmmsg and sends each flow's share of them with
// one sendmmsg; a flow's reader takes up to udpReplyBatch replies with one
// recvmmsg and sends them to the client with one sendmmsg. Under the load
// of scripts/bench-udp.sh that is about 1.2 system calls per round trip
// instead of 4.3 (recvfrom, write, read, sendto, and reads that found
// nothing), and 5-8 µs of l4lb CPU per round trip instead of 20. Within
// such a send, each run of equal-sized datagrams (a flow's share of a
// batch, or its replies) goes as one UDP GSO send (mmsg.Batch.Segment):
// the kernel routes and passes down one packet per run and cuts it into
// the datagrams at the device, or on loopback at the receiving socket.
// Under the same load a flow's share was about four datagrams, and this
// took l4lb from 10.6 to 6.8 µs of CPU per round trip and from 82k to
// 112k round trips/s (medians of 3, 64-byte datagrams). An idle
// socket still answers a lone datagram at once: a batch is what is
// waiting, never a wait for more. Sends never block: a datagram the kernel
// refuses (socket buffer full) is dropped and counted, as a UDP proxy must
// not stall its other flows for one.
//
// One goroutine per flow, not one epoll loop per worker: the reader waits
// in Go's netpoller without holding a buffer (RawConn.Read), so an idle
// flow costs a descriptor, a goroutine stack and the flow struct, about
// 3 KiB. An epoll loop of our own would save the stacks but run beside the
// netpoller and need descriptor-reuse guards of its own. With batching,
// perf puts the Go scheduler and netpoller (park, findRunnable, netpoll)
// at about 7% of l4lb's CPU and sendmmsg at over 60% (on loopback that
// includes delivering the datagram and waking its receiver), so such a
// loop has little left to win.
//
// Flows end in three ways, and only their worker ever removes them from its
// table: idle (the worker's timer wheel finds them), closed (a drain closed
// their socket, or the reader failed: the closed flag tells the worker at
// the flow's next datagram or wheel visit), or the worker's socket closes
// (shutdown). At a binary upgrade a flow may also leave, socket and all,
// for the new process (flowpass.go).

const (
	// udpBufSize is the buffer of one datagram in either direction. The
	// largest UDP payload is 65507 bytes over IPv4 (65535 − 20 bytes of IP
	// header − 8 of UDP header) and 65527 over IPv6 (payload length 65535
	// − 8, without jumbograms); 64 KiB holds either, so no datagram is
	// ever cut. An MTU-sized buffer would silently truncate fragmented
	// datagrams (EDNS answers, game state snapshots).
	udpBufSize = 1 << 16

	// udpBatch is how many datagrams a worker takes from its listen socket
	// with one recvmmsg. System calls, not copies, are the cost of a
	// datagram (on the 2-core VM of the benchmark one costs several µs),
	// so under load one call serves up to 32 datagrams; an idle socket
	// still answers its first datagram at once. Each slot holds
	// udpBufSize: 2 MiB of address space per worker, of which only what
	// datagrams fill is ever touched.
	udpBatch = 32
	// udpReplyBatch is the same for a flow's replies, read with one
	// recvmmsg and sent to the client with one sendmmsg. A flow has few
	// replies waiting at once, and busy flows each hold a batch while
	// they read (512 KiB of address space, touched as above).
	udpReplyBatch = 8

	// udpTick is the granularity of idle expiry: a flow ends between
	// idle_timeout and idle_timeout + udpTick after its last datagram.
	udpTick = 250 * time.Millisecond
	// udpWheelSlots is the timer wheel's size, a power of two: 256 slots of
	// udpTick cover 64 s, so a flow with the default 60 s idle_timeout is
	// looked at once per timeout. Longer timeouts wrap around the wheel and
	// are looked at once per lap.
	udpWheelSlots = 256

	// udpReadErrorPause is how long a worker waits after an unexpected
	// receive error (ENOMEM and the like) before it reads again, so that a
	// persistent error cannot spin a core.
	udpReadErrorPause = 5 * time.Millisecond
)

// DropReason says why a datagram was not delivered.
type DropReason int

const (
	// DropNoBackend: a new flow found no backend that takes new flows.
	DropNoBackend DropReason = iota
	// DropMaxFlows: a new flow would exceed max_flows.
	DropMaxFlows
	// DropDraining: a new flow arrived while the service stops.
	DropDraining
	// DropBackendSocket: the socket to the backend could not be opened.
	DropBackendSocket
	// DropSendBackend: sending to the backend failed (an earlier datagram
	// got an ICMP error, the socket buffer is full, or a drain closed it).
	DropSendBackend
	// DropBackendRefused: the backend host answered with ICMP port
	// unreachable: nothing listens there.
	DropBackendRefused
	// DropSendClient: sending a reply to the client failed.
	DropSendClient
	// DropReceive: the listen socket reported a receive error.
	DropReceive
	// DropDenied: the client address is in deny, or outside a non-empty
	// allow.
	DropDenied

	// NumDropReasons is the number of reasons, for arrays indexed by them.
	NumDropReasons
)

var dropReasonNames = [NumDropReasons]string{
	"no_backend", "max_flows", "draining", "backend_socket", "send_backend", "backend_refused", "send_client", "receive", "denied",
}

// String is the reason's name as metrics and logs show it.
func (r DropReason) String() string {
	if r < 0 || r >= NumDropReasons {
		return "unknown"
	}
	return dropReasonNames[r]
}

// UDPStats is a point-in-time copy of a UDP service's counters.
type UDPStats struct {
	// Datagrams and bytes sent on, each way.
	DatagramsToBackend, BytesToBackend uint64
	DatagramsToClient, BytesToClient   uint64
	FlowsActive                        int64
	FlowsCreated                       uint64
	// FlowsExpired ended at idle_timeout; FlowsAnswered once the backend
	// sent replies_per_datagram for each datagram; FlowsClosed otherwise
	// (a drain, a socket error, shutdown).
	FlowsExpired, FlowsAnswered, FlowsClosed uint64
	// FlowsRefused counts datagrams that would have opened a flow past
	// max_flows; they are in Drops[DropMaxFlows] too.
	FlowsRefused uint64
	// FlowsHandedOver went, socket and all, to the l4lb that took over at
	// a binary upgrade; FlowsTakenOver came from the one this took over
	// from (flowpass.go). Neither counts in FlowsCreated or the ends above.
	FlowsHandedOver, FlowsTakenOver uint64
	Drops                           [NumDropReasons]uint64
}

// UDPBackendStats is a point-in-time copy of one backend's UDP counters.
type UDPBackendStats struct {
	DatagramsToBackend, BytesToBackend uint64
	DatagramsToClient, BytesToClient   uint64
	FlowsActive                        int64
	FlowsCreated                       uint64
}

// udpBackend is the UDP side of a Backend: its open flows, so that a drain
// can close them, and its datagram counters (bytes go to the Backend's
// shared byte counters).
type udpBackend struct {
	mu    sync.Mutex // guards flows and the flows' beNext/bePrev links
	flows *udpFlow

	datagramsToBack atomic.Uint64
	datagramsToCli  atomic.Uint64
}

func (u *udpBackend) link(f *udpFlow) {
	u.mu.Lock()
	f.bePrev, f.beNext = nil, u.flows
	if u.flows != nil {
		u.flows.bePrev = f
	}
	u.flows = f
	u.mu.Unlock()
}

func (u *udpBackend) unlink(f *udpFlow) {
	u.mu.Lock()
	if f.bePrev != nil {
		f.bePrev.beNext = f.beNext
	} else if u.flows == f {
		u.flows = f.beNext
	}
	if f.beNext != nil {
		f.beNext.bePrev = f.bePrev
	}
	f.bePrev, f.beNext = nil, nil
	u.mu.Unlock()
}

// closeFlows closes the socket of every open flow to the backend; their
// workers remove them at their next datagram or wheel visit.
//
// The sockets are closed outside u.mu: a Close waits for the flow's reader
// to leave its callback, and a worker opening a flow to this backend must
// not wait on that.
func (u *udpBackend) closeFlows() {
	var flows []*udpFlow
	u.mu.Lock()
	for f := u.flows; f != nil; f = f.beNext {
		flows = append(flows, f)
	}
	u.mu.Unlock()
	for _, f := range flows {
		f.end()
	}
}

// UDPStats reads the backend's UDP counters.
func (b *Backend) UDPStats() UDPBackendStats {
	return UDPBackendStats{
		DatagramsToBackend: b.udp.datagramsToBack.Load(),
		BytesToBackend:     b.bytesToBack.Load(),
		DatagramsToClient:  b.udp.datagramsToCli.Load(),
		BytesToClient:      b.bytesToCli.Load(),
		FlowsActive:        b.active.Load(),
		FlowsCreated:       b.total.Load(),
	}
}

// udpFlow is one client address:port joined to one backend socket.
type udpFlow struct {
	client  netip.AddrPort
	conn    *os.File        // a UDP socket connected to backend.addr
	rc      syscall.RawConn // conn's
	backend *Backend
	w       *udpWorker // the owner: the only one that removes the flow
	// readFn is f.readReplies as a func value, made once so that waiting
	// for replies allocates nothing.
	readFn  func(fd uintptr) bool
	readErr error // set by readReplies for copyBackendToClient
	// proxyHeader prefixes each datagram to the backend with
	// proxy_protocol = "v2"; nil otherwise.
	proxyHeader []byte

	// lastSeen is when a datagram last went either way, in monotonicNow
	// units: the worker and the reader write it, the worker reads it.
	lastSeen atomic.Int64
	// closed is set once conn is closed; the worker then removes the flow.
	closed atomic.Bool
	// replies is the service's replies_per_datagram when the flow opened;
	// 0: not counted. owed is then the replies the backend still owes,
	// or flowAnswered once it owes none and the reader ends the flow.
	replies int64
	owed    atomic.Int64
	// endedNext links the flow in its worker's ended stack.
	endedNext *udpFlow
	// removed: the worker took the flow out of its table. Worker-owned.
	removed bool
	// uncounted: the flow's removal counts as no end: it went to the
	// l4lb that took over (HandOver), or, in that l4lb, it was passed in
	// the first round and ended in the old one before the second
	// (TakeFlows).
	uncounted atomic.Bool

	// Timer wheel links, owned by w. slot is -1 while unlinked.
	wPrev, wNext *udpFlow
	slot         int
	// Links in backend.udp.flows, guarded by backend.udp.mu.
	bePrev, beNext *udpFlow
}

// backendGone says, once f's backend has refused a datagram (ICMP port
// unreachable), whether the flow ends: it does when the backend is out of
// the route, since nothing listens there and the checks took it out, so
// that the client's next datagram opens a flow on a live backend, as
// nginx ends the session on that error. While the backend is routed the
// flow stays: it may be restarting.
func (f *udpFlow) backendGone() bool {
	return !slices.Contains(f.w.p.svc.route.Load().backends, f.backend)
}

// errBackendGone ends a flow whose backend refused a datagram and left
// the route (backendGone).
var errBackendGone = errors.New("backend refused the datagram and is out of the route")

// errFlowAnswered ends a flow whose backend sent every reply it owed.
var errFlowAnswered = errors.New("every reply owed was sent")

// flowAnswered is owed's value once the flow has all its replies: far
// below anything datagrams count down to, so that it reads as answered
// even after a late count.
const flowAnswered = math.MinInt64 / 2

// expect counts the replies owed for n more datagrams to the backend. It
// returns false when the reader has already found the flow answered: the
// datagrams need a new flow.
func (f *udpFlow) expect(n int) bool {
	for {
		owed := f.owed.Load()
		if owed <= flowAnswered/2 {
			return false
		}
		if f.owed.CompareAndSwap(owed, owed+int64(n)*f.replies) {
			return true
		}
	}
}

// answered counts n replies from the backend, and reports whether they
// were the last it owed; the flow is then marked answered, and no datagram
// counted after that goes on it.
func (f *udpFlow) answered(n int) bool {
	owed := f.owed.Add(-int64(n))
	return owed <= 0 && owed > flowAnswered/2 && f.owed.CompareAndSwap(owed, flowAnswered)
}

// errBackendRetired: the backend connect picked was retired meanwhile.
var errBackendRetired = errors.New("backend retired by a reload while picked")

// close closes the flow's backend socket, once; that ends its reader.
func (f *udpFlow) close() bool {
	if !f.closed.CompareAndSwap(false, true) {
		return false
	}
	f.conn.Close()
	// A closed flow is no longer open: it frees its max_flows slot and
	// leaves the gauges now, not when its worker next looks at it.
	f.backend.active.Add(-1)
	if p := f.w.p; p.active.Add(-1) == 0 && p.draining.Load() {
		p.wakeDrain()
	}
	return true
}

// end closes the flow from outside its worker (its reader, a drain) and
// hands it to the worker to remove: a flow whose client sends no more
// (a DNS client's port) would otherwise sit in the worker's table until
// idle_timeout.
func (f *udpFlow) end() {
	if !f.close() {
		return
	}
	w := f.w
	for {
		head := w.ended.Load()
		f.endedNext = head
		if w.ended.CompareAndSwap(head, f) {
			return
		}
	}
}

// copyBackendToClient sends the backend's replies to the client until the
// flow's socket is closed.
func (f *udpFlow) copyBackendToClient(rc syscall.RawConn) {
	defer f.w.p.readers.Done()
	for f.readErr == nil {
		if err := rc.Read(f.readFn); err != nil {
			break // closed: by the worker, a drain, or shutdown
		}
	}
	if f.readErr != nil && !errors.Is(f.readErr, net.ErrClosed) && f.readErr != errBackendGone && f.readErr != errFlowAnswered &&
		f.w.p.svc.allowLog(&f.w.p.lastReadErrLog) {
		f.w.p.log.Warn("udp flow ended by a receive error", "client", f.client, "backend", f.backend.addr, "error", f.readErr)
	}
	f.end()
}

// readReplies reads the datagrams waiting on the flow's socket, a batch at
// a time, and sends each batch to the client with one sendmmsg. It returns
// false when the socket is drained, to wait for more, and true with
// f.readErr set when the flow must end. Go's netpoller is edge-triggered,
// so drained must mean empty: a batch shorter than udpReplyBatch is, as
// recvmmsg with MSG_DONTWAIT stops only at an empty queue (a datagram
// arriving after that is a new edge), which saves the read that would
// return EAGAIN.
func (f *udpFlow) readReplies(fd uintptr) bool {
	w := f.w
	r := w.p.replyBatches.Get().(*udpSend)
	defer w.p.replyBatches.Put(r)
	b := r.b
	for {
		n, err := b.Recv(int(fd))
		switch err {
		case nil:
		case unix.EAGAIN:
			return false
		case unix.ECONNREFUSED:
			// ICMP port unreachable for an earlier datagram: the backend
			// host is up but nothing listens.
			w.replies.drops[DropBackendRefused].Add(1)
			if f.backendGone() {
				// Closed by copyBackendToClient: not here, inside the
				// read, which Close would wait for.
				f.readErr = errBackendGone
				return true
			}
			continue
		case unix.EMSGSIZE:
			// ICMP fragmentation needed: the kernel has learned the path's
			// MTU and fragments from now on. The flow goes on, its 4-tuple
			// kept: DTLS, QUIC and game servers key sessions by it.
			continue
		default:
			f.readErr = err
			return true
		}
		f.lastSeen.Store(monotonicNow())
		for i := range n {
			b.Bufs[i] = b.Bufs[i][:b.Lens[i]]
			b.SetAddr(i, f.client)
		}
		// Sent from the listen socket by any reader of the worker: the
		// kernel serialises sends on a socket, and Control keeps the
		// descriptor open meanwhile.
		r.n = n
		cerr := w.rc.Control(r.fn)
		b.ResetBufs()
		if cerr != nil {
			r.sent = 0
		}
		if r.sent < n {
			w.replies.drops[DropSendClient].Add(uint64(n - r.sent))
		}
		if r.sent > 0 {
			w.replies.datagrams.Add(uint64(r.sent))
			w.replies.bytes.Add(uint64(r.bytes))
			f.backend.udp.datagramsToCli.Add(uint64(r.sent))
			f.backend.bytesToCli.Add(uint64(r.bytes))
		}
		if cerr != nil {
			f.readErr = net.ErrClosed // the worker's socket is gone: shutdown
			return true
		}
		if f.replies > 0 && f.answered(n) {
			f.readErr = errFlowAnswered
			return true
		}
		if n < b.Len() {
			return false
		}
		if f.closed.Load() {
			// A backend that never stops sending would otherwise keep the
			// reader in this callback, and close (which waits for it) with
			// it.
			f.readErr = net.ErrClosed
			return true
		}
	}
}

// udpSend sends a batch's slots [0, n), all to one destination, with
// sendmmsg, runs of equal-sized datagrams segmented, and keeps the result;
// fn, its send method as a func value made once, is the RawConn.Control
// callback, so that sending allocates nothing.
type udpSend struct {
	b      *mmsg.Batch
	noAddr bool // the socket is connected: slots have no address
	n      int  // slots to send

	sent, bytes int // datagrams and bytes the last send moved
	// refused: the last send met a pending ICMP port unreachable.
	refused bool
	fn      func(fd uintptr)
}

func newUDPSend(b *mmsg.Batch, noAddr, segment bool) *udpSend {
	if segment {
		b.Segment()
	}
	s := &udpSend{b: b, noAddr: noAddr}
	s.fn = s.send
	return s
}

// send never waits: a datagram the kernel refuses (the socket buffer is
// full, or an error for that one datagram, such as a pending ICMP error)
// is skipped, as a UDP proxy must not stall its other flows for one.
func (s *udpSend) send(fd uintptr) {
	s.sent, s.bytes, s.refused = 0, 0, false
	for i := 0; i < s.n; {
		k, err := s.b.SendOne(int(fd), i, s.n, s.noAddr)
		for j := i; j < i+k; j++ {
			s.bytes += len(s.b.Bufs[j])
		}
		s.sent += k
		i += k
		if err != nil {
			s.refused = s.refused || err == unix.ECONNREFUSED
			i++
		}
	}
}

// udpWheel is a hashed timer wheel of flows by expiry tick. A flow sits in
// the slot of the tick its idle deadline falls in as of when it was
// inserted; datagrams move its deadline (lastSeen) without moving it, and
// when its slot comes up the worker either expires it or re-inserts it at
// its current deadline. So the per-datagram cost is one atomic store, and
// the sweep touches each flow about once per idle_timeout, never the whole
// table at once.
type udpWheel struct {
	slots [udpWheelSlots]*udpFlow
	// next is the first tick not processed yet. Ticks are monotonicNow /
	// udpTick; tick t holds deadlines in [t·udpTick, (t+1)·udpTick).
	next int64
}

func (wh *udpWheel) insert(f *udpFlow, tick int64) {
	tick = max(tick, wh.next)
	s := int(tick & (udpWheelSlots - 1))
	f.slot = s
	f.wPrev, f.wNext = nil, wh.slots[s]
	if f.wNext != nil {
		f.wNext.wPrev = f
	}
	wh.slots[s] = f
}

func (wh *udpWheel) unlink(f *udpFlow) {
	if f.slot < 0 {
		return
	}
	if f.wPrev != nil {
		f.wPrev.wNext = f.wNext
	} else {
		wh.slots[f.slot] = f.wNext
	}
	if f.wNext != nil {
		f.wNext.wPrev = f.wPrev
	}
	f.wPrev, f.wNext, f.slot = nil, nil, -1
}

// udpCounters are a worker's counters of the client-to-backend direction
// and of flows; only the worker writes them. Atomics so that Stats may read
// them at any time.
type udpCounters struct {
	datagrams, bytes atomic.Uint64
	flowsCreated     atomic.Uint64
	flowsExpired     atomic.Uint64
	flowsAnswered    atomic.Uint64
	flowsClosed      atomic.Uint64
	flowsRefused     atomic.Uint64
	flowsHandedOver  atomic.Uint64
	flowsTakenOver   atomic.Uint64
	drops            [NumDropReasons]atomic.Uint64
}

// udpReplyCounters count the backend-to-client direction; the readers of a
// worker's flows write them. They sit on their own cache lines, away from
// the worker's counters, which the worker writes per datagram.
type udpReplyCounters struct {
	_                [64]byte
	datagrams, bytes atomic.Uint64
	drops            [NumDropReasons]atomic.Uint64
	_                [64]byte
}

// udpWorker reads one listen socket and owns the flows of the clients the
// kernel hashes to it.
type udpWorker struct {
	p    *udpProxy
	conn *net.UDPConn
	rc   syscall.RawConn // conn's

	// Owned by the worker goroutine.
	in        *mmsg.Batch           // udpBatch datagrams from clients, by recvmmsg
	inFlows   []*udpFlow            // the flow of each datagram in in; nil once sent or dropped
	out       *udpSend              // the datagrams of one flow, to its backend
	readFn    func(fd uintptr) bool // w.readBatches, made once
	recvErr   error                 // set by readBatches for run
	flows     map[netip.AddrPort]*udpFlow
	wheel     udpWheel
	nextSweep int64 // monotonicNow when the wheel's next tick is due
	deadline  bool  // a read deadline is set (only while there are flows)
	// ended is a stack of flows closed by their readers or a drain, for
	// the worker to remove (udpFlow.end), linked by endedNext.
	ended atomic.Pointer[udpFlow]
	// parked is closed once the worker reads its socket no more, after
	// handOver or at its end: its table is then Server.HandOver's to read.
	parked   chan struct{}
	isParked bool // worker-owned: parked is closed

	c       udpCounters
	replies udpReplyCounters

	// prefixed holds, per send slot, a datagram with its PROXY v2 header
	// (withProxyHeader in proxyproto.go); nil until a v2 flow needs it.
	prefixed [][]byte
}

// udpProxy runs the workers of one UDP service.
//
// The Server creates it with the service's sockets and starts it; Drain
// stops new flows, waits for the open ones, then closes the sockets, which
// ends the workers and their flows. The proxy owns the sockets from
// newUDPProxy on.
type udpProxy struct {
	svc     *Service
	log     hclog.Logger
	workers []*udpWorker

	// active counts open flows over all workers, for max_flows.
	active   atomic.Int64
	draining atomic.Bool
	// handedOver: another l4lb serves the listening sockets now (HandOver);
	// the workers read them no more and only expire their flows, until
	// stopped is closed.
	handedOver atomic.Bool
	stopped    chan struct{}
	// flowsPassed is closed once the flows went to the l4lb that took
	// over, or stayed (Server.HandOver); the parked workers then expire
	// the flows that stayed.
	flowsPassed     chan struct{}
	flowsPassedOnce sync.Once
	// held, when not nil, keeps the workers from reading their sockets
	// until it is closed: the sockets were inherited at an upgrade, and
	// the flows of the l4lb that passed them must be in the tables
	// before the first datagram is read (Server.TakeFlows).
	held <-chan struct{}
	// drainWake wakes Drain when active reaches 0 while draining, or when
	// revive takes the proxy back; capacity 1, sends never block.
	drainWake chan struct{}
	// drainMu orders revive against Drain's decision to close: closing is
	// set, under it, once the sockets are about to close for good.
	drainMu sync.Mutex
	closing bool

	running sync.WaitGroup // worker loops
	readers sync.WaitGroup // flow readers

	// replyBatches hold *udpSend of udpReplyBatch slots for the flow
	// readers. A reader takes one only while its socket has datagrams to
	// read, so batches number the busy flows, not the open ones.
	replyBatches sync.Pool

	// dial opens a flow's socket to a backend: net.DialUDP, a field so
	// that tests can make it fail as a host out of descriptors does.
	dial func(backend netip.AddrPort) (*os.File, error)

	lastRefusalLog atomic.Int64 // monotonicNow of the last refusal log line
	lastReadErrLog atomic.Int64
	lastOpenErrLog atomic.Int64
}

// UDPSegmentation says whether UDP services send runs of datagrams as one
// segmented send, and if not, why: the environment has L4LB_UDP_GSO=off,
// or the kernel is older than 4.18. The kernel falls back to plain sends by
// itself where a path cannot segment; the switch is for a network driver
// that segments wrongly, a bug seen in the wild for UDP segmentation
// offload, until it is fixed.
func UDPSegmentation() (on bool, why string) {
	if os.Getenv("L4LB_UDP_GSO") == "off" {
		return false, "L4LB_UDP_GSO=off"
	}
	if !mmsg.SegmentationSupported() {
		return false, "the kernel has no UDP_SEGMENT (Linux 4.18)"
	}
	return true, ""
}

// newUDPProxy returns the proxy of svc over conns, a SO_REUSEPORT group,
// and makes it svc's UDP side (Service.UDPStats). Call start to serve.
func newUDPProxy(svc *Service, conns []*net.UDPConn, log hclog.Logger) *udpProxy {
	p := &udpProxy{svc: svc, log: log, drainWake: make(chan struct{}, 1), stopped: make(chan struct{}),
		flowsPassed: make(chan struct{}), dial: dialUDP}
	// The sockets of a group share their family; replies are addressed in it.
	inet6 := len(conns) > 0 && isInet6(conns[0])
	segment, _ := UDPSegmentation()
	p.replyBatches.New = func() any { return newUDPSend(mmsg.NewBatch(udpReplyBatch, udpBufSize, inet6), false, segment) }
	for _, c := range conns {
		// SyscallConn fails only for a nil conn.
		rc, _ := c.SyscallConn()
		w := &udpWorker{
			p:       p,
			conn:    c,
			rc:      rc,
			in:      mmsg.NewBatch(udpBatch, udpBufSize, inet6),
			inFlows: make([]*udpFlow, udpBatch),
			// Its slots point into in's buffers (or forward's argument).
			out:    newUDPSend(mmsg.NewBatch(udpBatch, 0, false), true, segment),
			flows:  make(map[netip.AddrPort]*udpFlow),
			parked: make(chan struct{}),
		}
		w.readFn = w.readBatches
		p.workers = append(p.workers, w)
	}
	svc.udp = p
	return p
}

// isInet6 says whether c is an AF_INET6 socket (one bound to an IPv6
// address or to [::]), whose peers' addresses are sockaddr_in6.
func isInet6(c *net.UDPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var domain int
	rc.Control(func(fd uintptr) { domain, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN) })
	return domain == unix.AF_INET6
}

// start runs one goroutine per worker.
func (p *udpProxy) start() {
	now := monotonicNow()
	for _, w := range p.workers {
		w.wheel.next = now / int64(udpTick)
		w.nextSweep = (w.wheel.next + 1) * int64(udpTick)
		p.running.Add(1)
		go w.run()
	}
}

// Drain stops opening flows, lets the open ones run until they idle out or
// deadline passes, then closes the sockets and every flow, and returns once
// all goroutines have ended, with how many flows were still open at
// deadline (and closed).
//
// It returns false, with nothing closed, when revive took the proxy back
// into service first: a reload that removed the service and a later one
// that brought it back while it drained.
func (p *udpProxy) Drain(deadline time.Time) (cut int64, drained bool) {
	p.draining.Store(true)
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
wait:
	for p.active.Load() > 0 && p.draining.Load() {
		select {
		case <-p.drainWake:
		case <-timer.C:
			break wait
		}
	}
	p.drainMu.Lock()
	if !p.draining.Load() {
		p.drainMu.Unlock()
		return 0, false
	}
	closedBefore := p.closing
	p.closing = true
	p.drainMu.Unlock()
	cut = p.active.Load()
	if !closedBefore {
		close(p.stopped)
	}
	for _, w := range p.workers {
		w.conn.Close()
	}
	p.running.Wait()
	// The workers have closed their flows on their way out; the tables are
	// ours now, and this closes the flows of workers never started.
	for _, w := range p.workers {
		w.closeAll()
	}
	p.readers.Wait()
	return cut, true
}

// revive takes a draining proxy back into service: new flows open again
// and its sockets stay. False when its drain has already begun to close
// them.
func (p *udpProxy) revive() bool {
	p.drainMu.Lock()
	defer p.drainMu.Unlock()
	if p.closing {
		return false
	}
	p.draining.Store(false)
	p.wakeDrain()
	return true
}

func (p *udpProxy) wakeDrain() {
	select {
	case p.drainWake <- struct{}{}:
	default:
	}
}

// Close closes the sockets and every flow at once, and returns when all
// goroutines have ended.
func (p *udpProxy) Close() { p.Drain(time.Now()) }

// handOver has the workers stop reading the listening sockets, which the
// l4lb that took over reads now (Server.HandOver). A worker asleep in
// its read is woken by the past deadline; one that sets its own deadline
// again meanwhile reads nothing more either: readBatches checks first.
func (p *udpProxy) handOver() {
	p.handedOver.Store(true)
	for _, w := range p.workers {
		w.conn.SetReadDeadline(time.Unix(1, 0))
	}
}

// errHandedOver ends a worker's read after handOver.
var errHandedOver = errors.New("listening socket handed over")

// openFlows is how many flows are open now.
func (p *udpProxy) openFlows() int64 { return p.active.Load() }

// UDPStats returns the counters of a UDP service; false for TCP services.
func (s *Service) UDPStats() (UDPStats, bool) {
	p := s.udp
	if p == nil {
		return UDPStats{}, false
	}
	st := UDPStats{FlowsActive: p.active.Load()}
	for _, w := range p.workers {
		st.DatagramsToBackend += w.c.datagrams.Load()
		st.BytesToBackend += w.c.bytes.Load()
		st.DatagramsToClient += w.replies.datagrams.Load()
		st.BytesToClient += w.replies.bytes.Load()
		st.FlowsCreated += w.c.flowsCreated.Load()
		st.FlowsExpired += w.c.flowsExpired.Load()
		st.FlowsAnswered += w.c.flowsAnswered.Load()
		st.FlowsClosed += w.c.flowsClosed.Load()
		st.FlowsRefused += w.c.flowsRefused.Load()
		st.FlowsHandedOver += w.c.flowsHandedOver.Load()
		st.FlowsTakenOver += w.c.flowsTakenOver.Load()
		for i := range st.Drops {
			st.Drops[i] += w.c.drops[i].Load() + w.replies.drops[i].Load()
		}
	}
	return st, true
}

func (w *udpWorker) run() {
	defer w.p.running.Done()
	defer w.park()
	if w.p.held != nil {
		select {
		case <-w.p.held:
		case <-w.p.stopped:
			w.closeAll()
			return
		}
	}
	for {
		if w.p.handedOver.Load() {
			w.park()
			select {
			case <-w.p.flowsPassed:
			case <-w.p.stopped:
			}
			w.expireHandedOver()
			return
		}
		// readBatches forwards datagrams until the socket is drained, then
		// waits in the netpoller for more (or the sweep's deadline).
		err := w.rc.Read(w.readFn)
		now := monotonicNow()
		if err == nil {
			err = w.recvErr
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, errHandedOver):
			// The wake-up for the sweep below, or for the loop's check.
		case errors.Is(err, net.ErrClosed):
			w.closeAll()
			return
		default:
			w.c.drops[DropReceive].Add(1)
			if w.p.svc.allowLog(&w.p.lastReadErrLog) {
				w.p.log.Warn("udp receive failed", "listen", w.conn.LocalAddr(), "error", err)
			}
			time.Sleep(udpReadErrorPause)
		}
		if now >= w.nextSweep {
			w.sweep(now)
		}
	}
}

// park says that the worker reads its socket no more, once.
func (w *udpWorker) park() {
	if !w.isParked {
		w.isParked = true
		close(w.parked)
	}
}

// expireHandedOver runs a worker whose listening socket another l4lb
// reads now: its flows still pass replies to their clients, and it
// removes them as they idle out, until the drain ends (stopped).
func (w *udpWorker) expireHandedOver() {
	for {
		now := monotonicNow()
		if now >= w.nextSweep {
			w.sweep(now)
		}
		timer := time.NewTimer(time.Duration(w.nextSweep - now))
		select {
		case <-w.p.stopped:
			timer.Stop()
			w.closeAll()
			return
		case <-timer.C:
		}
	}
}

// readBatches is the RawConn.Read callback of the listen socket: it reads
// up to udpBatch datagrams per recvmmsg and forwards them, until the socket
// is drained (false: wait for more) or a receive fails (true, with
// w.recvErr). A batch shorter than udpBatch means the socket is drained
// (see readReplies), so a busy socket costs one recvmmsg per batch and no
// read that returns EAGAIN.
func (w *udpWorker) readBatches(fd uintptr) bool {
	for {
		if w.p.handedOver.Load() {
			w.recvErr = errHandedOver
			return true
		}
		n, err := w.in.Recv(int(fd))
		if err == unix.EAGAIN {
			return false
		}
		if err != nil {
			w.recvErr = err
			return true
		}
		now := monotonicNow()
		if w.ended.Load() != nil {
			w.removeEnded()
		}
		w.forwardBatch(n, now)
		if now >= w.nextSweep {
			w.sweep(now)
		}
		// A drained socket waits for more, unless handOver came meanwhile:
		// forwarding the batch (install, sweep) may have reset the past
		// deadline it set to wake the worker, which must park.
		if n < w.in.Len() && !w.p.handedOver.Load() {
			return false
		}
	}
}

// forwardBatch sends the n datagrams in w.in to their flows' backends,
// opening flows for clients that have none. The datagrams of one flow go
// in order with one sendmmsg on its socket; flows are independent, so
// their order between each other does not matter.
func (w *udpWorker) forwardBatch(n int, now int64) {
	in := w.in
	for i := range n {
		w.inFlows[i] = w.flow(in.Addr(i), now)
	}
	for i := range n {
		f := w.inFlows[i]
		if f == nil {
			continue
		}
		// n is at most 32: a quadratic scan is cheaper than anything
		// that would need a map.
		k := 0
		for j := i; j < n; j++ {
			if w.inFlows[j] == f {
				w.out.b.Bufs[k] = w.withProxyHeader(f, k, in.Bufs[j][:in.Lens[j]])
				w.inFlows[j] = nil
				k++
			}
		}
		w.send(f, k, now)
	}
}

// forward sends one client datagram to its flow's backend, opening the
// flow first if the client has none. No allocation once the flow exists.
func (w *udpWorker) forward(b []byte, client netip.AddrPort, now int64) {
	if f := w.flow(client, now); f != nil {
		w.out.b.Bufs[0] = w.withProxyHeader(f, 0, b)
		w.send(f, 1, now)
	}
}

// flow returns the open flow of client, opening one if it has none, or nil
// when the datagram is dropped (counted).
func (w *udpWorker) flow(client netip.AddrPort, now int64) *udpFlow {
	f := w.flows[client]
	if f != nil && f.closed.Load() {
		// Drained or failed: the client starts over on a backend of the
		// current route.
		w.remove(f, false)
		f = nil
	}
	if f == nil {
		f = w.open(client, now)
	}
	return f
}

// send sends w.out's first k datagrams, all of f's, to f's backend.
func (w *udpWorker) send(f *udpFlow, k int, now int64) {
	if f.replies > 0 && !f.expect(k) {
		// The backend's last reply owed ended f as these datagrams came
		// (flow saw it open): they start a new flow.
		w.remove(f, false)
		if f = w.open(f.client, now); f == nil {
			return
		}
		if f.replies > 0 {
			f.expect(k) // a new flow: not answered yet
		}
	}
	f.lastSeen.Store(now)
	w.out.n = k
	if err := f.rc.Control(w.out.fn); err != nil {
		w.out.sent = 0 // closed by a drain
	}
	if w.out.sent < k {
		w.c.drops[DropSendBackend].Add(uint64(k - w.out.sent))
		if f.replies > 0 && f.answered((k-w.out.sent)*int(f.replies)) {
			// No reply comes for what was not sent, and every other
			// was in.
			w.remove(f, false)
		} else if w.out.refused && f.backendGone() {
			f.close()
		}
	}
	if sent := uint64(w.out.sent); sent > 0 {
		bytes := uint64(w.out.bytes)
		w.c.datagrams.Add(sent)
		w.c.bytes.Add(bytes)
		f.backend.udp.datagramsToBack.Add(sent)
		f.backend.bytesToBack.Add(bytes)
	}
}

// open creates the flow of client, or counts why it cannot and returns nil.
func (w *udpWorker) open(client netip.AddrPort, now int64) *udpFlow {
	p := w.p
	if p.draining.Load() {
		w.c.drops[DropDraining].Add(1)
		return nil
	}
	r := p.svc.route.Load()
	if !r.acl.admits(client.Addr().Unmap()) {
		// Checked per datagram: a denied client never gets a flow.
		w.c.drops[DropDenied].Add(1)
		return nil
	}
	if r.balancer == nil {
		w.c.drops[DropNoBackend].Add(1)
		return nil
	}
	if p.active.Add(1) > int64(r.cfg.MaxFlows) {
		p.active.Add(-1)
		w.c.flowsRefused.Add(1)
		w.c.drops[DropMaxFlows].Add(1)
		if p.svc.allowLog(&p.lastRefusalLog) {
			p.log.Warn("udp flow refused: max_flows reached", "client", client,
				"max_flows", r.cfg.MaxFlows, "refused_total", w.c.flowsRefused.Load())
		}
		return nil
	}
	key := clientKey(client, r.cfg.HashKey)
	var triedBuf [maxDialAttempts]int
	tried := triedBuf[:0]
	repicked := false
	dropped := DropBackendSocket
	for len(tried) < maxDialAttempts {
		i := r.balancer.pick(key, tried)
		if i < 0 {
			break
		}
		tried = append(tried, i)
		be := r.backends[i]
		f, err := w.connect(client, be, r.cfg.RepliesPerDatagram, now)
		if err == nil {
			return f
		}
		if err == errBackendRetired {
			// A reload retired it after r was loaded: the reload has
			// published its route by then, so one more pick finds it.
			if r = p.svc.route.Load(); repicked || r.balancer == nil {
				if r.balancer == nil {
					dropped = DropNoBackend
				}
				break
			}
			repicked = true
			key, tried = clientKey(client, r.cfg.HashKey), tried[:0]
			continue
		}
		if isLocalShortage(err) {
			// Out of descriptors, memory or local ports here (a UDP
			// connect finds no free port with EAGAIN, whatever the
			// destination): every backend would fail alike, and none of
			// them is to blame.
			if p.svc.allowLog(&p.lastOpenErrLog) {
				p.log.Warn("udp flow not opened: this host cannot open a socket", "client", client, "error", err)
			}
			break
		}
		failures := be.dialFailed.Add(1)
		if p.svc.allowLog(&p.lastOpenErrLog) {
			p.log.Warn("udp socket to backend failed, trying the next one", "backend", be.addr,
				"error", err, "failures_total", failures)
		}
	}
	p.active.Add(-1)
	w.c.drops[dropped].Add(1)
	return nil
}

// connect opens the flow's socket to be and starts its reader; replies is
// the service's replies_per_datagram.
func (w *udpWorker) connect(client netip.AddrPort, be *Backend, replies int, now int64) (*udpFlow, error) {
	conn, err := w.p.dial(be.addr)
	if err != nil {
		return nil, err
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, err
	}
	f := w.newFlow(client, conn, rc, be, replies)
	f.proxyHeader = w.flowProxyHeader(client)
	f.lastSeen.Store(now)
	if !w.install(f) {
		return nil, errBackendRetired
	}
	be.total.Add(1)
	w.c.flowsCreated.Add(1)
	return f, nil
}

func (w *udpWorker) newFlow(client netip.AddrPort, conn *os.File, rc syscall.RawConn, be *Backend, replies int) *udpFlow {
	f := &udpFlow{client: client, conn: conn, rc: rc, backend: be, w: w, slot: -1, replies: int64(replies)}
	f.readFn = f.readReplies
	return f
}

// install puts f, whose max_flows slot is held, into the worker's table
// and wheel and starts its reader; false, with f closed, when its backend
// takes no new flows.
func (w *udpWorker) install(f *udpFlow) bool {
	be := f.backend
	be.active.Add(1)
	be.udp.link(f)
	if be.refusesNew() {
		// Removed, or set to weight 0, while we picked it from the route
		// before: no drain would close this flow, so it ends before it
		// carries anything, and open picks again from the current route.
		// (retire sets the flag before closeFlows takes udp.mu: either
		// closeFlows sees the flow linked above, or this sees the flag.)
		f.close()
		be.udp.unlink(f)
		w.p.active.Add(1) // close gave back the slot the caller holds for the client
		return false
	}
	w.flows[f.client] = f
	w.wheel.insert(f, (f.lastSeen.Load()+int64(w.p.svc.route.Load().cfg.IdleTimeout))/int64(udpTick))
	if !w.deadline {
		w.conn.SetReadDeadline(clockStart.Add(time.Duration(w.nextSweep)))
		w.deadline = true
	}
	w.p.readers.Add(1)
	go f.copyBackendToClient(f.rc)
	return true
}

// dialUDP opens a non-blocking UDP socket connected to backend, on Go's
// netpoller. Four system calls (socket, connect, and os.NewFile's fcntl
// and epoll_ctl), where net.DialUDP makes seven: a flow per DNS query
// pays them per query.
func dialUDP(backend netip.AddrPort) (*os.File, error) {
	family := unix.AF_INET
	if !backend.Addr().Is4() {
		family = unix.AF_INET6
	}
	fd, err := rawSocket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "udp", Addr: net.UDPAddrFromAddrPort(backend), Err: os.NewSyscallError("socket", err)}
	}
	if err := rawConnect(fd, backend); err != nil {
		rawClose(fd)
		return nil, &net.OpError{Op: "dial", Net: "udp", Addr: net.UDPAddrFromAddrPort(backend), Err: os.NewSyscallError("connect", err)}
	}
	f := os.NewFile(uintptr(fd), "udp flow to "+backend.String())
	// NewFile falls back to a blocking file when the netpoller cannot
	// watch the socket (epoll_ctl: ENOSPC or ENOMEM), and says nothing: a
	// deadline, which only a watched file takes, tells.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, &net.OpError{Op: "dial", Net: "udp", Addr: net.UDPAddrFromAddrPort(backend), Err: errNotWatched}
	}
	return f, nil
}

// errNotWatched: the netpoller could not watch a new flow socket, for want
// of epoll watches or memory: this host's shortage.
var errNotWatched = errors.New("the netpoller cannot watch the socket (fs.epoll.max_user_watches or memory)")

// remove takes f out of the worker's table and wheel and closes it, once;
// expired says whether idle_timeout ended it.
func (w *udpWorker) remove(f *udpFlow, expired bool) {
	if f.removed {
		return
	}
	f.removed = true
	if w.flows[f.client] == f {
		delete(w.flows, f.client)
	}
	w.wheel.unlink(f)
	f.close()
	f.backend.udp.unlink(f)
	switch {
	case f.uncounted.Load():
	case expired:
		w.c.flowsExpired.Add(1)
	case f.replies > 0 && f.owed.Load() <= flowAnswered/2:
		w.c.flowsAnswered.Add(1)
	default:
		w.c.flowsClosed.Add(1)
	}
}

// removeEnded removes the flows on the ended stack.
func (w *udpWorker) removeEnded() {
	for f := w.ended.Swap(nil); f != nil; {
		next := f.endedNext
		f.endedNext = nil
		w.remove(f, false)
		f = next
	}
}

// sweep processes the wheel's ticks that are due at now: flows past their
// idle deadline or closed are removed, the others go to the slot of their
// current deadline.
func (w *udpWorker) sweep(now int64) {
	w.removeEnded()
	idle := int64(w.p.svc.route.Load().cfg.IdleTimeout)
	tick := int64(udpTick)
	// Tick t is due once all of its deadlines, < (t+1)·udpTick, are past.
	// After a long stall one lap over the wheel visits every flow.
	for n := 0; (w.wheel.next+1)*tick <= now && n < udpWheelSlots; n++ {
		s := int(w.wheel.next & (udpWheelSlots - 1))
		f := w.wheel.slots[s]
		w.wheel.slots[s] = nil
		w.wheel.next++ // before re-inserting: a flow due later goes to a later tick
		for f != nil {
			next := f.wNext
			f.wPrev, f.wNext, f.slot = nil, nil, -1
			deadline := f.lastSeen.Load() + idle
			switch {
			case f.closed.Load():
				w.remove(f, false)
			case deadline <= now:
				w.remove(f, true)
			default:
				w.wheel.insert(f, deadline/tick)
			}
			f = next
		}
	}
	w.wheel.next = max(w.wheel.next, now/tick)
	w.nextSweep = (w.wheel.next + 1) * tick
	if len(w.flows) > 0 {
		w.conn.SetReadDeadline(clockStart.Add(time.Duration(w.nextSweep)))
		w.deadline = true
	} else if w.deadline {
		// Nothing to expire: sleep in the read until a datagram comes.
		w.conn.SetReadDeadline(time.Time{})
		w.deadline = false
	}
}

// closeAll removes every flow; the worker's socket is closed.
func (w *udpWorker) closeAll() {
	for _, f := range w.flows {
		w.remove(f, false)
	}
}
