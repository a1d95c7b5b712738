package l4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/l4lb/l4lb/config"
)

// Passing UDP flows at a binary upgrade.
//
// A UDP flow is a socket connected to its backend: its source port is
// what the backend knows the client by, and game servers, DTLS and QUIC
// key their sessions by it. At an upgrade the new process reads the same
// listening sockets (handover.go), but a flow socket it opened itself
// would come from a new port, and the backend would see a stranger. So
// the old process passes each flow, its socket and its state, over the
// upgrade's readiness socket (a SOCK_SEQPACKET socketpair), in two
// rounds:
//
//	new → old   'R'                          ready
//	            the old one's workers still read the listening sockets:
//	old → new   'P' n records + n sockets     every open flow, up to flowsPerMessage a message (SCM_RIGHTS)
//	new → old   'A' n bits                   which of them it took
//	            the old one's workers stop reading:
//	old → new   'C' n × (id, idle, owed)     the flows of the first round still open, with their state now
//	new → old   'A' n bits                   which of them it keeps
//	old → new   'F' n records + n sockets    the flows opened since the first round
//	new → old   'A' n bits
//	old → new   'E'                          done: the new one's workers read
//
// The order makes it exact: the new process's workers on inherited
// sockets do not read them until the flows are in their tables
// (Server.HoldInheritedUDP, TakeFlows), and the old one's workers have
// stopped reading them before the second round reads their tables
// (Server.HandOver). Datagrams that come in between wait in the sockets'
// receive queues. The first round, a descriptor and a netpoller
// registration per flow (about 20 µs each), runs while the old process
// still serves, so that the wait is the second round's: a few bytes per
// flow, and the sockets of flows opened meanwhile. The first round's
// flows the second does not name ended in the old process meanwhile,
// and the new one closes its copies. The kernel hashes a client to the same socket
// of the group in either process, so each flow goes to the worker of the
// socket it was on, named by the socket's cookie, which both processes
// read from their own descriptors of it.
//
// While both processes hold a flow's socket, whichever reads a reply
// sends it on to the client from the same listening socket, so that
// overlap loses nothing. A flow the new process does not take (its
// config dropped the backend or the service, max_flows, the access
// list) stays with the old process, which passes replies until it idles
// out, as a reload's drain does.

const (
	flowMsgEarly   = 'P'
	flowMsgConfirm = 'C'
	flowMsgFlows   = 'F'
	flowMsgAck     = 'A'
	flowMsgEnd     = 'E'

	// flowsPerMessage stays below the kernel's SCM_MAX_FD (253
	// descriptors per message).
	flowsPerMessage = 200
	// flowRecordSize: listening socket cookie 8, client 16+2, backend
	// 16+2, idle 8, owed 8, replies 4, flags 1, padding 3, client's
	// zone (interface index) 4.
	flowRecordSize = 72
	// confirmsPerMessage: a confirm is id 4, idle 8, owed 8.
	confirmsPerMessage = 2048
	confirmSize        = 20
)

// A flow record's flags.
const (
	flowClient4     = 1 << iota // the client address is IPv4
	flowBackend4                // the backend address is IPv4
	flowProxyHeader             // the flow prefixes a PROXY v2 header
)

// FlowPassTimeout bounds the old process's passing of the flows at an
// upgrade: a new process that stalls longer leaves the rest with it.
const FlowPassTimeout = 5 * time.Second

// flowRecord is the state of one flow, as passed.
type flowRecord struct {
	listenCookie    uint64
	client, backend netip.AddrPort
	idle            time.Duration // since the last datagram either way
	owed            int64
	replies         int32
	proxyHeader     bool
}

func (r *flowRecord) appendTo(b []byte) []byte {
	var flags byte
	if r.client.Addr().Is4() {
		flags |= flowClient4
	}
	if r.backend.Addr().Is4() {
		flags |= flowBackend4
	}
	if r.proxyHeader {
		flags |= flowProxyHeader
	}
	rec := make([]byte, flowRecordSize)
	le := binary.LittleEndian
	le.PutUint64(rec[0:], r.listenCookie)
	c16 := r.client.Addr().As16()
	copy(rec[8:24], c16[:])
	le.PutUint16(rec[24:], r.client.Port())
	b16 := r.backend.Addr().As16()
	copy(rec[26:42], b16[:])
	le.PutUint16(rec[42:], r.backend.Port())
	le.PutUint64(rec[44:], uint64(r.idle))
	le.PutUint64(rec[52:], uint64(r.owed))
	le.PutUint32(rec[60:], uint32(r.replies))
	rec[64] = flags
	// A link-local client's zone: the worker keys its flow by the
	// address with it (mmsg.Batch.Addr), and replies need it.
	le.PutUint32(rec[68:], zoneIndex(r.client.Addr().Zone()))
	return append(b, rec...)
}

func parseFlowRecord(rec []byte) flowRecord {
	le := binary.LittleEndian
	addr := func(b []byte, is4 bool) netip.Addr {
		a := netip.AddrFrom16([16]byte(b))
		if is4 {
			a = a.Unmap()
		}
		return a
	}
	flags := rec[64]
	client := addr(rec[8:24], flags&flowClient4 != 0)
	if zone := le.Uint32(rec[68:]); zone != 0 && !client.Is4() {
		client = client.WithZone(strconv.FormatUint(uint64(zone), 10))
	}
	return flowRecord{
		listenCookie: le.Uint64(rec[0:]),
		client:       netip.AddrPortFrom(client, le.Uint16(rec[24:])),
		backend:      netip.AddrPortFrom(addr(rec[26:42], flags&flowBackend4 != 0), le.Uint16(rec[42:])),
		idle:         time.Duration(le.Uint64(rec[44:])),
		owed:         int64(le.Uint64(rec[52:])),
		replies:      int32(le.Uint32(rec[60:])),
		proxyHeader:  flags&flowProxyHeader != 0,
	}
}

// zoneIndex is the interface index of an IPv6 zone: mmsg.Batch.Addr
// gives it as a number; a name is looked up. 0 for none.
func zoneIndex(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if i, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(i)
	}
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	return 0
}

// socketCookie is the kernel's identity of the socket fd refers to, the
// same through every descriptor of it, in any process.
func socketCookie(fd int) (uint64, error) {
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
}

// FlowsPassed is what passing the flows at an upgrade did: Passed went
// to the new process; Kept stayed with the old one (not taken, or not
// offered after an error).
type FlowsPassed struct {
	Passed, Kept int
	// Paused is how long no process read the UDP listening sockets: from
	// the old one's workers stopping to the end of the passing.
	Paused time.Duration
}

// HandOver makes the UDP services stop reading their listening sockets,
// now shared with the l4lb that took over: every new datagram goes to
// it. With flows, the upgrade's socket to that l4lb (TakeFlows at its
// end), it passes it every open flow, socket and all, so that the flows
// keep their backend-side ports: first while the workers still read
// (most of the work), then the rest once they have stopped. The flows
// not taken keep passing their backends' replies to their clients until
// they idle out, as in a drain. Call it just before Shutdown, which
// drains the TCP connections and those flows. An error says why some
// flows were not offered; they stay, as those not taken do.
func (srv *Server) HandOver(flows *net.UnixConn) (FlowsPassed, error) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var proxies []*udpProxy
	for _, rs := range srv.running {
		if rs.udp != nil {
			proxies = append(proxies, rs.udp)
		}
	}
	// The parked workers expire whatever stays, once this is done.
	defer func() {
		for _, p := range proxies {
			p.flowsPassedOnce.Do(func() { close(p.flowsPassed) })
		}
	}()
	var res FlowsPassed
	if flows == nil {
		for _, p := range proxies {
			p.handOver()
		}
		return res, nil
	}
	deadline := time.Now().Add(FlowPassTimeout)
	flows.SetDeadline(deadline)
	ps := &flowPasser{conn: flows, early: make(map[*udpFlow]uint32)}
	cookies := make(map[*udpWorker]uint64)
	var err error
	for _, p := range proxies {
		for _, w := range p.workers {
			cookie, cerr := w.listenCookie()
			if cerr != nil {
				// Closed under a stop: its flows are not passed.
				continue
			}
			cookies[w] = cookie
		}
	}

	// First round, while the workers serve.
	ps.kind = flowMsgEarly
	for _, p := range proxies {
		for _, f := range p.openFlowsNow() {
			if cookie, ok := cookies[f.w]; ok && err == nil {
				err = ps.add(f, cookie)
			}
		}
	}
	if err == nil {
		err = ps.flush()
	}
	// After a failure the second round counts what stays.
	ps.batch = ps.batch[:0]
	ps.closeFDs()

	if srv.betweenFlowRounds != nil {
		srv.betweenFlowRounds()
	}

	// Second round, once they have stopped.
	paused := time.Now()
	for _, p := range proxies {
		p.handOver()
	}
	late := make(map[*udpWorker][]*udpFlow)
	for _, p := range proxies {
		for _, w := range p.workers {
			if perr := w.awaitParked(deadline); perr != nil {
				// Its table may still be the worker's: not read here, and
				// its flows, still its, are not counted.
				if err == nil {
					err = perr
				}
				continue
			}
			for _, f := range w.flows {
				if f.removed || f.closed.Load() {
					continue
				}
				id, taken := ps.early[f]
				_, cookied := cookies[w]
				switch {
				case err != nil || ps.refused[f] || !cookied:
					res.Kept++
				case taken:
					err = ps.confirm(f, id)
				default:
					late[w] = append(late[w], f)
				}
			}
		}
	}
	if err == nil {
		err = ps.flushConfirms()
	}
	ps.kind = flowMsgFlows
	for w, fs := range late {
		for _, f := range fs {
			if err != nil {
				res.Kept++
				continue
			}
			err = ps.add(f, cookies[w])
		}
	}
	if err == nil {
		err = ps.flush()
	}
	if err == nil {
		_, err = flows.Write([]byte{flowMsgEnd})
	}
	res.Paused = time.Since(paused)
	// Offered in a message that failed: whether the new process took
	// them is unknown, so they stay here, and may run in both (either
	// passes replies on).
	res.Kept += len(ps.batch) + len(ps.confirms) + ps.kept
	ps.closeFDs()
	// The new process reads the sockets of those it acknowledged (it
	// keeps them whatever comes after): this side's descriptors go, and
	// the workers remove the flows at their next sweep.
	for _, f := range ps.passed {
		f.uncounted.Store(true)
		f.end()
		f.w.c.flowsHandedOver.Add(1)
	}
	res.Passed = len(ps.passed)
	return res, err
}

// openFlowsNow returns the proxy's open flows, from its backends' lists:
// its workers' tables are theirs while they run.
func (p *udpProxy) openFlowsNow() []*udpFlow {
	s := p.svc
	s.mu.Lock()
	backends := make([]*Backend, 0, len(s.backends)+len(s.draining))
	for _, b := range s.backends {
		backends = append(backends, b)
	}
	for _, b := range s.draining {
		backends = append(backends, b)
	}
	s.mu.Unlock()
	var flows []*udpFlow
	for _, b := range backends {
		b.udp.mu.Lock()
		for f := b.udp.flows; f != nil; f = f.beNext {
			if !f.closed.Load() {
				flows = append(flows, f)
			}
		}
		b.udp.mu.Unlock()
	}
	return flows
}

// awaitParked waits until the worker reads its socket no more.
func (w *udpWorker) awaitParked(deadline time.Time) error {
	select {
	case <-w.parked:
		return nil // even once deadline has passed
	default:
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-w.parked:
		return nil
	case <-timer.C:
		return fmt.Errorf("udp worker on %s still reading its socket", w.conn.LocalAddr())
	}
}

func (w *udpWorker) listenCookie() (cookie uint64, err error) {
	if cerr := w.rc.Control(func(fd uintptr) { cookie, err = socketCookie(int(fd)) }); cerr != nil {
		return 0, cerr
	}
	return cookie, err
}

// flowPasser sends flows to the new process a message at a time.
type flowPasser struct {
	conn *net.UnixConn
	kind byte // of the flows' messages: flowMsgEarly or flowMsgFlows
	// batch holds the flows of the message being built, msg the message,
	// fds duplicates of their sockets.
	batch []*udpFlow
	msg   []byte
	fds   []int
	// early numbers the first round's flows the new process took, in the
	// order sent; refused holds those it did not.
	early   map[*udpFlow]uint32
	sent    uint32 // first-round flows sent, the next one's id
	refused map[*udpFlow]bool
	// confirms are the second round's first-round flows, not yet sent.
	confirms    []*udpFlow
	confirmsMsg []byte
	// passed are the flows the new process keeps, for this side to let
	// go once the passing is over; kept counts those of the second round
	// it did not take.
	passed []*udpFlow
	kept   int
}

// add puts f into the message being built, with a duplicate of its
// socket: a reader may close the flow's descriptor meanwhile, and one
// reused by then must not be sent in its place. A flow closed already is
// left out.
func (ps *flowPasser) add(f *udpFlow, listenCookie uint64) error {
	dup := -1
	var err error
	if cerr := f.rc.Control(func(fd uintptr) { dup, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); cerr != nil {
		return nil // closed: it ended
	}
	if err != nil {
		if ps.kind == flowMsgFlows {
			// Not offered: it stays. (The second round's scan counts
			// the first round's.)
			ps.kept++
		}
		return fmt.Errorf("duplicate the socket of the flow of %s: %w", f.client, err)
	}
	if len(ps.batch) == 0 {
		ps.msg = append(ps.msg[:0], ps.kind, 0, 0)
	}
	ps.fds = append(ps.fds, dup)
	rec := flowRecord{
		listenCookie: listenCookie,
		client:       f.client,
		backend:      f.backend.addr,
		idle:         time.Duration(max(0, monotonicNow()-f.lastSeen.Load())),
		owed:         f.owed.Load(),
		replies:      int32(f.replies),
		proxyHeader:  f.proxyHeader != nil,
	}
	ps.msg = rec.appendTo(ps.msg)
	ps.batch = append(ps.batch, f)
	if len(ps.batch) == flowsPerMessage {
		return ps.flush()
	}
	return nil
}

// flush sends the batch with the flows' sockets, and notes which flows
// the new process took; kept counts those of the second round it did
// not take (the first round's are in refused).
func (ps *flowPasser) flush() error {
	if len(ps.batch) == 0 {
		return nil
	}
	binary.LittleEndian.PutUint16(ps.msg[1:], uint16(len(ps.batch)))
	_, _, err := ps.conn.WriteMsgUnix(ps.msg, unix.UnixRights(ps.fds...), nil)
	ps.closeFDs()
	if err != nil {
		return err
	}
	ack, err := ps.readAck(len(ps.batch))
	if err != nil {
		return err
	}
	for i, f := range ps.batch {
		taken := ack[i/8]&(1<<(i%8)) != 0
		switch {
		case ps.kind == flowMsgFlows && taken:
			ps.passed = append(ps.passed, f)
		case ps.kind == flowMsgFlows:
			ps.kept++
		case taken:
			ps.early[f] = ps.sent
		default:
			if ps.refused == nil {
				ps.refused = make(map[*udpFlow]bool)
			}
			ps.refused[f] = true
		}
		if ps.kind == flowMsgEarly {
			ps.sent++
		}
	}
	ps.batch = ps.batch[:0]
	return nil
}

func (ps *flowPasser) closeFDs() {
	for _, fd := range ps.fds {
		unix.Close(fd)
	}
	ps.fds = ps.fds[:0]
}

// confirm tells the new process that the first round's flow id is still
// open, with its state now.
func (ps *flowPasser) confirm(f *udpFlow, id uint32) error {
	if len(ps.confirms) == 0 {
		ps.confirmsMsg = append(ps.confirmsMsg[:0], flowMsgConfirm, 0, 0)
	}
	le := binary.LittleEndian
	ps.confirmsMsg = le.AppendUint32(ps.confirmsMsg, id)
	ps.confirmsMsg = le.AppendUint64(ps.confirmsMsg, uint64(max(0, monotonicNow()-f.lastSeen.Load())))
	ps.confirmsMsg = le.AppendUint64(ps.confirmsMsg, uint64(f.owed.Load()))
	ps.confirms = append(ps.confirms, f)
	if len(ps.confirms) == confirmsPerMessage {
		return ps.flushConfirms()
	}
	return nil
}

func (ps *flowPasser) flushConfirms() error {
	if len(ps.confirms) == 0 {
		return nil
	}
	binary.LittleEndian.PutUint16(ps.confirmsMsg[1:], uint16(len(ps.confirms)))
	if _, err := ps.conn.Write(ps.confirmsMsg); err != nil {
		return err
	}
	ack, err := ps.readAck(len(ps.confirms))
	if err != nil {
		return err
	}
	for i, f := range ps.confirms {
		if ack[i/8]&(1<<(i%8)) != 0 {
			ps.passed = append(ps.passed, f)
		} else {
			// Its copy ended in the new process: it stays here.
			ps.kept++
		}
	}
	ps.confirms = ps.confirms[:0]
	return nil
}

// readAck reads the new process's answer to a message of n flows: a bit
// each, set for those it took.
func (ps *flowPasser) readAck(n int) ([]byte, error) {
	ack := make([]byte, 3+confirmsPerMessage/8)
	got, err := ps.conn.Read(ack)
	if err != nil {
		return nil, err
	}
	if got < 3 || ack[0] != flowMsgAck || int(binary.LittleEndian.Uint16(ack[1:])) != n || got != 3+(n+7)/8 {
		return nil, errors.New("malformed answer to the flows passed")
	}
	return ack[3:got], nil
}

// HoldInheritedUDP has the UDP services that the first Apply serves from
// inherited sockets (Adopt) read them only once TakeFlows has put the
// flows passed with them into their tables. Call it before the first
// Apply, and TakeFlows after it.
func (srv *Server) HoldInheritedUDP() {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.udpHold = make(chan struct{})
}

// releaseUDP lets the held UDP services read their sockets.
func (srv *Server) releaseUDP() {
	srv.udpHoldOnce.Do(func() {
		if srv.udpHold != nil {
			close(srv.udpHold)
		}
	})
}

// TakeFlows takes the UDP flows the l4lb this one took over from passes
// over conn (HandOver at its end), into the tables of the services that
// serve the sockets they were on, until it says it is done, closes conn,
// or timeout passes. Then the held services read their sockets
// (HoldInheritedUDP). It returns how many flows it took and refused.
func (srv *Server) TakeFlows(conn *net.UnixConn, timeout time.Duration) (taken, refused int, err error) {
	defer srv.releaseUDP()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	workers := make(map[uint64]*udpWorker)
	for _, rs := range srv.running {
		if rs.udp == nil || rs.udp.held == nil {
			continue
		}
		for _, w := range rs.udp.workers {
			if cookie, err := w.listenCookie(); err == nil {
				workers[cookie] = w
			}
		}
	}
	// early holds the first round's flows by id, nil for those refused;
	// those the second round does not confirm ended in the old process
	// meanwhile, or stay there, and go.
	var early []*udpFlow
	var earlyOwed []int64 // the replies each owed as passed
	dropUnconfirmed := func() {
		for _, f := range early {
			if f != nil && !f.removed && f.uncounted.Load() {
				f.w.remove(f, false)
			}
		}
	}
	defer dropUnconfirmed()
	unconfirmedDropped := false
	conn.SetDeadline(time.Now().Add(timeout))
	msg := make([]byte, 3+max(flowsPerMessage*flowRecordSize, confirmsPerMessage*confirmSize))
	oob := make([]byte, unix.CmsgSpace(flowsPerMessage*4))
	for {
		n, oobn, flags, _, err := conn.ReadMsgUnix(msg, oob)
		fds, perr := receivedFDs(oob[:oobn])
		if err == nil && n == 0 {
			err = errors.New("closed before every flow was passed")
		}
		if err == nil {
			err = perr
		}
		if err == nil && flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			err = errors.New("a message of flows was cut short")
		}
		count := 0
		if err == nil && n >= 3 {
			count = int(binary.LittleEndian.Uint16(msg[1:]))
		}
		switch kind := msg[0]; {
		case err != nil:
		case (kind == flowMsgEarly || kind == flowMsgFlows) && n >= 3:
			if n != 3+count*flowRecordSize || len(fds) != count || count == 0 || count > flowsPerMessage {
				err = fmt.Errorf("malformed message of flows: %d bytes, %d sockets", n, len(fds))
			}
		case kind == flowMsgConfirm && n >= 3:
			if n != 3+count*confirmSize || len(fds) != 0 || count == 0 || count > confirmsPerMessage {
				err = fmt.Errorf("malformed message of flows confirmed: %d bytes, %d sockets", n, len(fds))
			}
		case kind == flowMsgEnd && n == 1 && len(fds) == 0:
			return taken, refused, nil
		default:
			err = fmt.Errorf("unexpected message %q", msg[:min(n, 8)])
		}
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			return taken, refused, err
		}
		if msg[0] == flowMsgFlows && !unconfirmedDropped {
			unconfirmedDropped = true
			// Every confirm came before: the first round's flows not
			// confirmed go now, so that their clients, who may have a
			// flow among these (one that ended in the old process and
			// opened again), and their max_flows slots are free.
			dropUnconfirmed()
		}
		now := monotonicNow()
		ack := make([]byte, 3+(count+7)/8)
		ack[0] = flowMsgAck
		binary.LittleEndian.PutUint16(ack[1:], uint16(count))
		for i := range count {
			ok := false
			switch msg[0] {
			case flowMsgConfirm:
				rec := msg[3+i*confirmSize:]
				le := binary.LittleEndian
				id := le.Uint32(rec)
				if int(id) < len(early) && early[id] != nil && early[id].uncounted.Load() && !early[id].closed.Load() {
					f := early[id]
					// Both processes read the flow's replies between the
					// rounds, each datagram once: the replies owed are the
					// old one's count less those read here since.
					readHere := earlyOwed[id] - f.owed.Load()
					f.owed.Store(int64(le.Uint64(rec[12:])) - readHere)
					f.lastSeen.Store(max(f.lastSeen.Load(), now-int64(le.Uint64(rec[4:]))))
					f.uncounted.Store(false)
					f.w.c.flowsTakenOver.Add(1)
					taken++
					ok = true
				} else {
					// Its copy here ended: it stays with the old one.
					refused++
				}
			default:
				rec := parseFlowRecord(msg[3+i*flowRecordSize:])
				var f *udpFlow
				if w := workers[rec.listenCookie]; w != nil {
					f = w.adopt(rec, fds[i], now)
				} else {
					unix.Close(fds[i])
				}
				ok = f != nil
				switch {
				case !ok:
					refused++
				case msg[0] == flowMsgEarly:
					// This process's only once confirmed.
					f.uncounted.Store(true)
				default:
					f.w.c.flowsTakenOver.Add(1)
					taken++
				}
				if msg[0] == flowMsgEarly {
					early = append(early, f)
					earlyOwed = append(earlyOwed, rec.owed)
				}
			}
			if ok {
				ack[3+i/8] |= 1 << (i % 8)
			}
		}
		if _, err := conn.Write(ack); err != nil {
			return taken, refused, err
		}
	}
}

// receivedFDs returns the descriptors passed in a message's control data.
func receivedFDs(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, c := range cmsgs {
		rights, err := unix.ParseUnixRights(&c)
		if err == nil {
			fds = append(fds, rights...)
		}
	}
	return fds, nil
}

// adopt installs the flow passed with fd, a socket connected to its
// backend; nil, with fd closed, when this l4lb does not take it: the
// client has a flow here already, the service stops, the config denies
// the client, has no such backend or one that takes no new flows, or
// max_flows is reached. Only before the worker runs (held).
func (w *udpWorker) adopt(rec flowRecord, fd int, now int64) *udpFlow {
	p := w.p
	be := p.svc.configuredBackend(rec.backend)
	r := p.svc.route.Load()
	if w.flows[rec.client] != nil || p.draining.Load() || be == nil || be.refusesNew() ||
		!r.acl.admits(rec.client.Addr().Unmap()) || !connectedTo(fd, rec.backend) {
		unix.Close(fd)
		return nil
	}
	if p.active.Add(1) > int64(r.cfg.MaxFlows) {
		p.active.Add(-1)
		unix.Close(fd)
		return nil
	}
	conn := os.NewFile(uintptr(fd), "udp flow to "+rec.backend.String())
	rc, err := conn.SyscallConn()
	if err == nil {
		// Watched by the netpoller, as dialUDP checks.
		err = conn.SetReadDeadline(time.Time{})
	}
	if err != nil {
		conn.Close()
		p.active.Add(-1)
		return nil
	}
	f := w.newFlow(rec.client, conn, rc, be, int(rec.replies))
	f.owed.Store(rec.owed)
	if rec.proxyHeader {
		dst := w.conn.LocalAddr().(*net.UDPAddr).AddrPort()
		f.proxyHeader = appendProxyHeader(nil, config.ProxyV2, rec.client, dst, true)
	}
	f.lastSeen.Store(now - int64(rec.idle))
	if !w.install(f) {
		p.active.Add(-1)
		return nil
	}
	return f
}

// connectedTo says whether fd is a UDP socket connected to backend.
func connectedTo(fd int, backend netip.AddrPort) bool {
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_DGRAM {
		return false
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return false
	}
	peer, _, ok := sockaddrAddrPort(sa)
	return ok && peer.Addr().Unmap() == backend.Addr().WithZone("").Unmap() && peer.Port() == backend.Port()
}

// configuredBackend is the service's configured backend at addr, or nil.
// A flow record carries no zone for the backend: a link-local backend
// (fe80::1%eth0) is matched by address and port.
func (s *Service) configuredBackend(addr netip.AddrPort) *Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.backends[addr]; b != nil {
		return b
	}
	for at, b := range s.backends {
		if at.Addr().WithZone("") == addr.Addr() && at.Port() == addr.Port() {
			return b
		}
	}
	return nil
}
