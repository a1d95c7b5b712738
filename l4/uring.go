package l4

import (
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
	return r, nil
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
		if err := r.enter(want, want); err != nil {
			return err
		}
		head := *r.cqHead
		for got := uint32(0); got < want; {
			if head == atomic.LoadUint32(r.cqTail) {
				// Not all done inside the call (they should be, being
				// MSG_DONTWAIT): wait for the rest.
				if err := r.enter(0, 1); err != nil {
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

// enter submits toSubmit entries and waits for minComplete completions.
// It never waits on the network, the sends being MSG_DONTWAIT: hence a
// RawSyscall, like the loop's other calls (rawsys.go).
func (r *ioRing) enter(toSubmit, minComplete uint32) error {
	for {
		_, _, errno := unix.RawSyscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uringEnterGetEvents, 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			// What was submitted stays submitted; submit the rest, and
			// the caller waits for any completion still missing.
			toSubmit = atomic.LoadUint32(r.sqTail) - atomic.LoadUint32(r.sqHead)
			if toSubmit == 0 {
				return nil
			}
		default:
			return os.NewSyscallError("io_uring_enter", errno)
		}
	}
}
