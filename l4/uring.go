package l4

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioRing is an io_uring used for one thing: to make the reads, then the
// writes, of an event loop's round with one system call each instead of
// one per socket. On this kind of VM a system call costs 1-2 µs on entry
// and exit alone: a batch of 16 small loopback sends took 4.0 µs per send
// with write(2) and 1.9 µs with one io_uring_enter (docs/performance.md).
//
// Every operation is MSG_DONTWAIT, so the kernel completes each one inside
// io_uring_enter (done, partly done, or EAGAIN) and never parks it for
// later: the ring is empty again when the call returns, and the loop's
// buffers are free.
type ioRing struct {
	fd             int
	sqHead, sqTail *uint32
	sqMask         uint32
	sqArray        []uint32
	sqes           []uringSQE
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []uringCQE
	entries        uint32
	mem, sqeMem    []byte
}

// The kernel's struct io_uring_sqe and io_uring_cqe, as far as a send
// uses them.
type uringSQE struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	msgFlags uint32
	userData uint64
	_        [3]uint64
}

type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	_                                                                      [3]uint32
	sqOff                                                                  uringSQOffsets
	cqOff                                                                  uringCQOffsets
}

type uringSQOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, _ uint32
	_                                                           uint64
}

type uringCQOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, _ uint32
	_                                                           uint64
}

const (
	uringOpSend         = 26 // IORING_OP_SEND
	uringOpRecv         = 27 // IORING_OP_RECV
	uringOffSQRing      = 0
	uringOffSQEs        = 0x10000000
	uringFeatSingleMmap = 1 << 0
	uringEnterGetEvents = 1 << 0
	// IORING_SETUP_SUBMIT_ALL (keep submitting past a failed entry) and
	// IORING_SETUP_COOP_TASKRUN (no interrupt to run completion work: the
	// loop is in io_uring_enter for it anyway).
	uringSetupFlags = 1<<7 | 1<<8
)

// newIORing sets up a ring of n entries. It fails where io_uring is
// missing or forbidden (old kernels, kernel.io_uring_disabled, seccomp
// profiles such as Docker's default); the loop then uses read(2) and
// write(2).
func newIORing(n uint32) (*ioRing, error) {
	var p uringParams
	p.flags = uringSetupFlags
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(n), uintptr(unsafe.Pointer(&p)), 0)
	if errno == unix.EINVAL {
		// A kernel older than 5.19 does not know the flags.
		p = uringParams{}
		fd, _, errno = unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(n), uintptr(unsafe.Pointer(&p)), 0)
	}
	if errno != 0 {
		return nil, os.NewSyscallError("io_uring_setup", errno)
	}
	r := &ioRing{fd: int(fd), entries: p.sqEntries}
	if p.features&uringFeatSingleMmap == 0 {
		unix.Close(r.fd)
		return nil, os.NewSyscallError("io_uring_setup", unix.ENOSYS) // before 5.4
	}
	size := max(int(p.sqOff.array+p.sqEntries*4), int(p.cqOff.cqes+p.cqEntries*uint32(unsafe.Sizeof(uringCQE{}))))
	var err error
	if r.mem, err = unix.Mmap(r.fd, uringOffSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Close(r.fd)
		return nil, os.NewSyscallError("mmap", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, uringOffSQEs, int(p.sqEntries)*int(unsafe.Sizeof(uringSQE{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Munmap(r.mem)
		unix.Close(r.fd)
		return nil, os.NewSyscallError("mmap", err)
	}
	base := unsafe.Pointer(&r.mem[0])
	r.sqHead = (*uint32)(unsafe.Add(base, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(base, p.sqOff.tail))
	r.sqMask = *(*uint32)(unsafe.Add(base, p.sqOff.ringMask))
	r.sqArray = unsafe.Slice((*uint32)(unsafe.Add(base, p.sqOff.array)), p.sqEntries)
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqHead = (*uint32)(unsafe.Add(base, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(base, p.cqOff.tail))
	r.cqMask = *(*uint32)(unsafe.Add(base, p.cqOff.ringMask))
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Add(base, p.cqOff.cqes)), p.cqEntries)
	if err := r.probe(uringOpRecv, uringOpSend); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

// uringProbe is the kernel's struct io_uring_probe with room for every
// opcode.
type uringProbe struct {
	lastOp, opsLen uint8
	_              uint16
	_              [3]uint32
	ops            [256]struct {
		op, _ uint8
		flags uint16
		_     uint32
	}
}

const (
	uringRegisterProbe   = 8 // IORING_REGISTER_PROBE
	uringOpSupported     = 1 // IO_URING_OP_SUPPORTED
	sysIOURingRegisterNr = unix.SYS_IO_URING_REGISTER
)

// probe checks that the kernel knows the opcodes: a ring sets up from
// Linux 5.4, but sends and receives came in 5.6 (as did the probe), and
// each one would fail with EINVAL.
func (r *ioRing) probe(opcodes ...uint8) error {
	var p uringProbe
	_, _, errno := unix.Syscall6(sysIOURingRegisterNr, uintptr(r.fd), uringRegisterProbe, uintptr(unsafe.Pointer(&p)), uintptr(len(p.ops)), 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring has no opcode probe (Linux 5.6 brought it, and sends and receives): %w", os.NewSyscallError("io_uring_register", errno))
	}
	for _, op := range opcodes {
		if op > p.lastOp || p.ops[op].flags&uringOpSupported == 0 {
			return fmt.Errorf("io_uring lacks opcode %d (IORING_OP_SEND is 26, IORING_OP_RECV 27)", op)
		}
	}
	return nil
}

// run makes each of ops, a recv (from op.fd into op.buf) or a send (op.buf
// to op.fd) as opcode says, and stores each result in its res: bytes
// moved, or a negated errno. At most r.entries at a time.
func (r *ioRing) run(ops []pendingOp, opcode uint8) error {
	flags := uint32(unix.MSG_DONTWAIT)
	if opcode == uringOpSend {
		flags |= unix.MSG_NOSIGNAL
	}
	for len(ops) > 0 {
		batch := ops[:min(len(ops), int(r.entries))]
		ops = ops[len(batch):]
		tail := *r.sqTail
		for i := range batch {
			op := &batch[i]
			idx := tail & r.sqMask
			r.sqes[idx] = uringSQE{opcode: opcode, fd: int32(op.fd),
				addr: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(op.buf)))), len: uint32(len(op.buf)),
				msgFlags: flags, userData: uint64(i)}
			r.sqArray[idx] = idx
			tail++
		}
		atomic.StoreUint32(r.sqTail, tail)
		want := uint32(len(batch))
		if err := r.submit(want); err != nil {
			return err
		}
		head := *r.cqHead
		retried := false
		for got := uint32(0); got < want; {
			if head == atomic.LoadUint32(r.cqTail) {
				// Every operation is MSG_DONTWAIT and completes inside the
				// call; one that did not would leave the loop waiting, so
				// the ring counts as broken (after one more look, in case
				// the kernel left completion work to this call).
				if retried {
					return errOpNotInline
				}
				retried = true
				if _, err := r.enterRaw(0, 0); err != nil && err != unix.EINTR {
					return err
				}
				continue
			}
			cqe := &r.cqes[head&r.cqMask]
			batch[cqe.userData].res = cqe.res
			head++
			got++
			atomic.StoreUint32(r.cqHead, head)
		}
	}
	return nil
}

var errOpNotInline = errors.New("io_uring: an operation did not complete inside io_uring_enter")

// submit hands the kernel the n entries queued. io_uring_enter may take
// fewer than asked (before Linux 5.19, or short of memory); it is asked
// again for the rest, and the ring counts as broken if it takes none.
func (r *ioRing) submit(n uint32) error {
	for n > 0 {
		took, err := r.enter(n)
		if err != nil {
			return err
		}
		if took == 0 {
			return errors.New("io_uring_enter submitted nothing")
		}
		n -= took
	}
	return nil
}

// enter submits up to toSubmit entries and returns how many it took. It
// never waits (min_complete is 0): hence a RawSyscall, like the loop's
// other calls (rawsys.go).
func (r *ioRing) enter(toSubmit uint32) (uint32, error) {
	for {
		took, err := r.enterRaw(toSubmit, 0)
		if err != unix.EINTR {
			return took, err
		}
	}
}

func (r *ioRing) enterRaw(toSubmit, minComplete uint32) (uint32, error) {
	n, _, errno := unix.RawSyscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uringEnterGetEvents, 0, 0)
	if errno != 0 {
		if errno == unix.EINTR {
			return 0, errno
		}
		return 0, os.NewSyscallError("io_uring_enter", errno)
	}
	return uint32(n), nil
}

// close releases the ring. The kernel cancels what it still holds.
func (r *ioRing) close() {
	unix.Munmap(r.sqeMem)
	unix.Munmap(r.mem)
	unix.Close(r.fd)
}
