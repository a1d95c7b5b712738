package l4

import (
	"math"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The round: a loop handles a batch of events without reading or writing
// in read/write mode; it queues each read and each write, and flushRound
// makes all the reads with one io_uring_enter, then all the writes they
// produced with another. A message then costs two shares of two system
// calls instead of a read and a write of its own (docs/performance.md has
// the measurements). Bulk transfers splice, outside the round.

const (
	// roundArenaSize holds the reads of a round: 64 of a full buffer each.
	// A loop queues more reads than that only with more connections ready
	// at once; the rest are read at once into scratch.
	roundArenaSize = 64 * copyBufSize
	ioRingEntries  = 128
)

// ioRingWanted is false with `l4lb run -no-io-uring`, and in tests of the
// read(2)/write(2) path.
var ioRingWanted = true

// DisableIOURing makes the event loops read and write one system call
// each. It must come before the first TCP service starts: the loops are
// set up once.
func DisableIOURing() { ioRingWanted = false }

// IOURing says whether the TCP event loops batch their reads and writes
// with io_uring as they start, and if not, why not (nil after
// DisableIOURing).
func IOURing() (bool, error) {
	set := loops()
	return ioRingWanted && set.ringErr == nil, set.ringErr
}

// pendingOp is one read or write of a round, for direction d of c.
type pendingOp struct {
	c      *proxyConn
	d      *direction
	sf, df *sockFlags
	// fd is the socket read from or written to; dst, for a read, is
	// where its bytes go next.
	fd, dst int
	buf     []byte
	// res is what the call returned: bytes moved, or a negated errno.
	res int32
}

const resUnset = math.MinInt32

// queueRecv adds a read of direction d to the round, when the loop has a
// ring and room in its arena.
func (l *eventLoop) queueRecv(c *proxyConn, d *direction, src, dst int, sf, df *sockFlags) bool {
	if l.ring == nil || len(l.arena)-l.arenaUsed < copyBufSize {
		return false
	}
	buf := l.arena[l.arenaUsed : l.arenaUsed+copyBufSize]
	l.arenaUsed += copyBufSize
	d.busy = true
	l.recvs.add(pendingOp{c: c, d: d, sf: sf, df: df, fd: src, dst: dst, buf: buf})
	return true
}

// queueSend adds the write of p, read into the arena for direction d, to
// the round.
func (l *eventLoop) queueSend(c *proxyConn, d *direction, df *sockFlags, dst int, p []byte) {
	d.busy = true
	l.sends.add(pendingOp{c: c, d: d, df: df, fd: dst, buf: p})
}

// flushRound makes the round's reads, then its writes, then lets each
// connection that took part go on, which may queue another round, made
// the same way before the loop polls again. Operations of connections
// closed since they were queued are dropped unmade: their descriptors are
// closed and may already be reused.
func (l *eventLoop) flushRound() {
	for len(l.recvs.queued) > 0 || len(l.sends.queued) > 0 {
		l.runQueue(&l.recvs, uringOpRecv, l.recvDone)
		l.runQueue(&l.sends, uringOpSend, l.sendDone)
		// Every byte in the arena went out or was copied to a held buffer.
		l.arenaUsed = 0
		touched := l.touched
		for _, c := range touched {
			if c.state == stateOpen {
				c.pump()
			}
		}
		clear(touched)
		l.touched = touched[:0]
	}
}

// runQueue makes the operations queued in q and hands each result whose
// connection is still open to done.
func (l *eventLoop) runQueue(q *opQueue, opcode uint8, done func(*pendingOp)) {
	ops := q.take()
	if len(ops) == 0 {
		return
	}
	l.makeOps(ops, opcode)
	for i := range ops {
		op := &ops[i]
		if op.c.state == stateClosed {
			continue // an earlier result of the round ended it
		}
		op.d.busy = false
		l.touched = append(l.touched, op.c)
		done(op)
	}
	clear(ops)
}

// recvDone goes on from a read of the round as from a read(2).
func (l *eventLoop) recvDone(op *pendingOp) {
	var err error
	if op.res < 0 {
		err = syscall.Errno(-op.res)
	}
	if err = op.c.afterRead(op.d, op.dst, op.sf, op.df, op.buf, int(max(op.res, 0)), err, true); err != nil {
		op.c.finish(err)
	}
}

// sendDone holds what a write of the round left, or goes on from its
// failure (writeFailed).
func (l *eventLoop) sendDone(op *pendingOp) {
	if op.res < 0 && op.res != -int32(unix.EAGAIN) && op.res != -int32(unix.EINTR) {
		err := &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.Errno(-op.res))}
		if end := op.c.writeFailed(op.d, op.df, err); end != nil {
			op.c.finish(end)
		}
		return
	}
	if op.res == -int32(unix.EAGAIN) {
		op.df.writable = false
	}
	if sent := int(max(op.res, 0)); sent < len(op.buf) {
		// The rest is held; flush writes it as the connection goes on,
		// or finds the socket full and waits for EPOLLOUT.
		op.d.hold(l, op.buf[sent:])
	}
}

// opQueue is the operations of one kind queued for the round, and the
// array of those being made, swapped at each take.
type opQueue struct{ queued, taken []pendingOp }

func (q *opQueue) add(op pendingOp) { q.queued = append(q.queued, op) }

// take takes the queued operations out, leaving the queue empty, without
// those of closed connections.
func (q *opQueue) take() []pendingOp {
	q.queued, q.taken = q.taken[:0], q.queued
	ops := q.taken[:0]
	for _, op := range q.taken {
		if op.c.state != stateClosed {
			ops = append(ops, op)
		}
	}
	clear(q.taken[len(ops):])
	return ops
}

// makeOps makes each of ops (all reads or all writes, as opcode says) and
// sets its res.
func (l *eventLoop) makeOps(ops []pendingOp, opcode uint8) {
	if l.ring != nil {
		for i := range ops {
			ops[i].res = resUnset
		}
		err := l.ring.run(ops, opcode)
		if err == nil {
			return
		}
		// Only a broken ring gets here (each operation completes inside
		// the call): the loop reads and writes without it from now on, and
		// the connections whose operations are unaccounted for end, since
		// one made twice would corrupt their streams. The arena stays the
		// loop's for good, so that nothing the kernel might still write
		// there lands in reused memory.
		l.ring.close()
		l.ring, l.ringErr = nil, err
		ops[0].c.svc.log.Error("io_uring failed: this event loop reads and writes with a system call each from now on, and the connections it was reading or writing for are closed",
			"error", err)
		for i := range ops {
			if ops[i].res == resUnset {
				ops[i].res = -int32(unix.EIO)
			}
		}
		return
	}
	// Without a ring nothing is queued, unless the ring broke in this
	// round: then its writes are made here, and its reads fail.
	for i := range ops {
		op := &ops[i]
		if opcode != uringOpSend {
			op.res = -int32(unix.EIO)
			continue
		}
		for {
			n, err := rawWrite(op.fd, op.buf)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				op.res = -int32(err.(syscall.Errno))
			} else {
				op.res = int32(n)
			}
			break
		}
	}
}
