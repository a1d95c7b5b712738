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
// upgrade's readiness socket (a SOCK_SEQPACKET socketpair):
//
//	new → old   'R'                       ready: stop reading the listening sockets
//	old → new   'F' n records + n fds     up to flowsPerMessage flows (SCM_RIGHTS)
//	new → old   'A' n bits                which of them it took
//	            … more 'F'/'A' …
//	old → new   'E'                       every flow passed
//
// The order makes it exact: the new process's workers on inherited
// sockets do not read them until the flows are in their tables
// (Server.HoldInheritedUDP, TakeFlows), and the old one's workers have
// stopped reading them before their tables are read (Server.HandOver).
// Datagrams that come in between wait in the sockets' receive queues,
// for a few milliseconds. The kernel hashes a client to the same socket
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
	flowMsgFlows = 'F'
	flowMsgAck   = 'A'
	flowMsgEnd   = 'E'

	// flowsPerMessage stays below the kernel's SCM_MAX_FD (253
	// descriptors per message).
	flowsPerMessage = 200
	// flowRecordSize: listening socket cookie 8, client 16+2, backend
	// 16+2, idle 8, owed 8, replies 4, flags 1, padding 3, client's
	// zone (interface index) 4.
	flowRecordSize = 72
)

// A flow record's flags.
const (
	flowClient4     = 1 << iota // the client address is IPv4
	flowBackend4                // the backend address is IPv4
	flowProxyHeader             // the flow prefixes a PROXY v2 header
)

// FlowPassTimeout bounds passing the flows at an upgrade, on either side:
// a peer that stalls longer leaves the rest with the old process.
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
}

// HandOver makes the UDP services stop reading their listening sockets,
// now shared with the l4lb that took over: every new datagram goes to
// it. With flows, the upgrade's socket to that l4lb (TakeFlows at its
// end), it first passes it every open flow, socket and all, so that the
// flows keep their backend-side ports. The flows not taken keep passing
// their backends' replies to their clients until they idle out, as in a
// drain. Call it just before Shutdown, which drains the TCP connections
// and those flows. An error says why some flows were not offered; they
// stay, as those not taken do.
func (srv *Server) HandOver(flows *net.UnixConn) (FlowsPassed, error) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var proxies []*udpProxy
	for _, rs := range srv.running {
		if rs.udp != nil {
			rs.udp.handOver()
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
		return res, nil
	}
	deadline := time.Now().Add(FlowPassTimeout)
	flows.SetDeadline(deadline)
	ps := flowPasser{conn: flows, res: &res}
	var err error
	for _, p := range proxies {
		for _, w := range p.workers {
			if perr := w.awaitParked(deadline); perr != nil {
				// Its table may still be the worker's: not read here.
				if err == nil {
					err = perr
				}
				continue
			}
			cookie, cerr := w.listenCookie()
			for _, f := range w.flows {
				if f.removed || f.closed.Load() {
					continue
				}
				if err == nil && cerr != nil {
					err = cerr
				}
				if err != nil {
					res.Kept++
					continue
				}
				err = ps.add(f, cookie)
			}
		}
	}
	if err == nil {
		err = ps.flush()
	}
	if err == nil {
		_, err = flows.Write([]byte{flowMsgEnd})
	}
	res.Kept += len(ps.batch) // offered in a message that failed
	return res, err
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
	conn  *net.UnixConn
	batch []*udpFlow
	msg   []byte
	res   *FlowsPassed
}

func (ps *flowPasser) add(f *udpFlow, listenCookie uint64) error {
	if len(ps.batch) == 0 {
		ps.msg = append(ps.msg[:0], flowMsgFlows, 0, 0)
	}
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

// flush sends the batch with a duplicate of each flow's socket, and
// closes the old process's side of those the new one took.
func (ps *flowPasser) flush() error {
	if len(ps.batch) == 0 {
		return nil
	}
	binary.LittleEndian.PutUint16(ps.msg[1:], uint16(len(ps.batch)))
	// Duplicates: a reader may close a flow's descriptor meanwhile, and
	// one reused by then must not be sent in its place.
	fds := make([]int, 0, len(ps.batch))
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for _, f := range ps.batch {
		dup := -1
		var err error
		if cerr := f.rc.Control(func(fd uintptr) { dup, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); cerr != nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("duplicate the socket of the flow of %s: %w", f.client, err)
		}
		fds = append(fds, dup)
	}
	if _, _, err := ps.conn.WriteMsgUnix(ps.msg, unix.UnixRights(fds...), nil); err != nil {
		return err
	}
	ack := make([]byte, 3+flowsPerMessage/8+1)
	n, err := ps.conn.Read(ack)
	if err != nil {
		return err
	}
	if n < 3 || ack[0] != flowMsgAck || int(binary.LittleEndian.Uint16(ack[1:])) != len(ps.batch) || n != 3+(len(ps.batch)+7)/8 {
		return errors.New("malformed answer to the flows passed")
	}
	for i, f := range ps.batch {
		if ack[3+i/8]&(1<<(i%8)) == 0 {
			ps.res.Kept++
			continue
		}
		// The new process reads the socket now; this side's descriptor
		// goes, and the worker removes the flow at its next sweep.
		f.handedOver.Store(true)
		f.end()
		f.w.c.flowsHandedOver.Add(1)
		ps.res.Passed++
	}
	ps.batch = ps.batch[:0]
	return nil
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
	conn.SetDeadline(time.Now().Add(timeout))
	msg := make([]byte, 3+flowsPerMessage*flowRecordSize)
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
		if err == nil && msg[0] == flowMsgFlows && n >= 3 {
			count = int(binary.LittleEndian.Uint16(msg[1:]))
			if n != 3+count*flowRecordSize || len(fds) != count || count > flowsPerMessage {
				err = fmt.Errorf("malformed message of flows: %d bytes, %d sockets", n, len(fds))
			}
		} else if err == nil && !(msg[0] == flowMsgEnd && n == 1 && len(fds) == 0) {
			err = fmt.Errorf("unexpected message %q", msg[:min(n, 8)])
		}
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			return taken, refused, err
		}
		if count == 0 {
			return taken, refused, nil
		}
		now := monotonicNow()
		ack := make([]byte, 3+(count+7)/8)
		ack[0] = flowMsgAck
		binary.LittleEndian.PutUint16(ack[1:], uint16(count))
		for i := range count {
			rec := parseFlowRecord(msg[3+i*flowRecordSize:])
			w := workers[rec.listenCookie]
			if w != nil && w.adopt(rec, fds[i], now) {
				ack[3+i/8] |= 1 << (i % 8)
				taken++
			} else {
				if w == nil {
					unix.Close(fds[i])
				}
				refused++
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
// backend; false, with fd closed, when this l4lb does not take it: the
// client has a flow here already, the service stops, the config denies
// the client, has no such backend or one that takes no new flows, or
// max_flows is reached. Only before the worker runs (held).
func (w *udpWorker) adopt(rec flowRecord, fd int, now int64) bool {
	p := w.p
	be := p.svc.configuredBackend(rec.backend)
	r := p.svc.route.Load()
	if w.flows[rec.client] != nil || p.draining.Load() || be == nil || be.refusesNew() ||
		!r.acl.admits(rec.client.Addr().Unmap()) || !connectedTo(fd, rec.backend) {
		unix.Close(fd)
		return false
	}
	if p.active.Add(1) > int64(r.cfg.MaxFlows) {
		p.active.Add(-1)
		unix.Close(fd)
		return false
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
		return false
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
		return false
	}
	w.c.flowsTakenOver.Add(1)
	return true
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
	var peer netip.AddrPort
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		peer = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		peer = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return peer.Addr().Unmap() == backend.Addr().WithZone("").Unmap() && peer.Port() == backend.Port()
}

// configuredBackend is the service's configured backend at addr, or nil.
func (s *Service) configuredBackend(addr netip.AddrPort) *Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.backends[addr]
}
