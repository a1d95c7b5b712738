package listener

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

func TestListenTCPSharesPortAcrossSockets(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			lns, err := ListenTCP(context.Background(), netip.AddrPortFrom(netip.MustParseAddr(host), 0), 1)
			if err != nil {
				t.Fatal(err)
			}
			// Port 0 picks a port for the first socket; bind three more to it.
			port := lns[0].Addr().(*net.TCPAddr).AddrPort().Port()
			lns[0].Close()
			addr := netip.AddrPortFrom(netip.MustParseAddr(host), port)
			lns, err = ListenTCP(context.Background(), addr, 4)
			if err != nil {
				t.Fatal(err)
			}
			raws, err := RawAll(lns)
			if err != nil {
				t.Fatal(err)
			}
			accepted := make(chan int, 64)
			var wg sync.WaitGroup
			for i, raw := range raws {
				wg.Add(1)
				go func() {
					defer wg.Done()
					err := Serve(raw, func(c Conn) {
						accepted <- i
						go echoRaw(c.FD)
					}, hclog.NewNullLogger())
					if err != nil {
						t.Errorf("Serve returned %v after close, want nil", err)
					}
				}()
			}
			// Different source ports hash to different sockets; with 64
			// connections over 4 sockets, at least two must be used.
			for range 64 {
				c, err := net.Dial("tcp", addr.String())
				if err != nil {
					t.Fatal(err)
				}
				c.Write([]byte("x"))
				buf := make([]byte, 1)
				if _, err := io.ReadFull(c, buf); err != nil || buf[0] != 'x' {
					t.Fatalf("echo through socket failed: %v", err)
				}
				c.Close()
			}
			used := map[int]bool{}
			for range 64 {
				used[<-accepted] = true
			}
			if len(used) < 2 {
				t.Errorf("64 connections all went to one of 4 sockets: %v", used)
			}
			for _, raw := range raws {
				raw.Close()
			}
			wg.Wait()
		})
	}
}

func TestListenTCPBusyAddressClosesAll(t *testing.T) {
	plain, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT: blocks the group
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	addr := plain.Addr().(*net.TCPAddr).AddrPort()
	if _, err := ListenTCP(context.Background(), addr, 2); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("want EADDRINUSE, got %v", err)
	}
}

// fakeAcceptor fails with the queued errors, then reports closed.
type fakeAcceptor struct{ errs []error }

func (f *fakeAcceptor) AcceptRaw() (Conn, error) {
	if len(f.errs) == 0 {
		return Conn{}, net.ErrClosed
	}
	err := f.errs[0]
	f.errs = f.errs[1:]
	return Conn{}, err
}

func (f *fakeAcceptor) Addr() net.Addr { return &net.TCPAddr{} }

func TestServeBacksOffOnTransientErrors(t *testing.T) {
	emfile := &net.OpError{Op: "accept", Err: &os.SyscallError{Syscall: "accept4", Err: syscall.EMFILE}}
	errs := make([]error, 10)
	for i := range errs {
		errs[i] = emfile
	}
	errs[4] = &net.OpError{Op: "accept", Err: syscall.ENOBUFS}
	var slept []time.Duration
	err := serve(&fakeAcceptor{errs: errs}, func(Conn) { t.Error("handler called without a connection") },
		hclog.NewNullLogger(), func(d time.Duration) { slept = append(slept, d) })
	if err != nil {
		t.Fatalf("serve returned %v, want nil on close", err)
	}
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	if len(slept) != len(want) {
		t.Fatalf("slept %v, want %d sleeps", slept, len(want))
	}
	for i := range want {
		if slept[i] != want[i]*time.Millisecond {
			t.Errorf("sleep %d = %v, want %v", i, slept[i], want[i]*time.Millisecond)
		}
	}
}

// Accepted sockets get keepalive and TCP_NODELAY from the listening socket
// alone: AcceptRaw sets no option per connection.
func TestAcceptedSocketsInheritKeepalive(t *testing.T) {
	lns, err := ListenTCP(context.Background(), netip.MustParseAddrPort("127.0.0.1:0"), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lns[0].Close() })
	c, err := net.Dial("tcp", lns[0].Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	raw, err := Raw(lns[0])
	if err != nil {
		t.Fatal(err)
	}
	a, err := raw.AcceptRaw()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(a.FD) })
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); a.Peer != want {
		t.Errorf("accepted peer %v, want %v", a.Peer, want)
	}
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		var got int
		var gerr error
		got, gerr = unix.GetsockoptInt(a.FD, o.level, o.opt)
		if gerr != nil || got != o.want {
			t.Errorf("accepted socket %s = %d (%v), want %d", o.name, got, gerr, o.want)
		}
	}
}

// echoRaw echoes a raw accepted socket until EOF, then closes it. The
// socket is non-blocking; os.NewFile puts it on Go's netpoller.
func echoRaw(fd int) {
	f := os.NewFile(uintptr(fd), "accepted")
	defer f.Close()
	io.Copy(f, f)
}
