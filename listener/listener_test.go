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
			accepted := make(chan int, 64)
			var wg sync.WaitGroup
			for i, ln := range lns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					err := Serve(ln, func(c *net.TCPConn) {
						accepted <- i
						go func() {
							io.Copy(c, c)
							c.Close()
						}()
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
			for _, ln := range lns {
				ln.Close()
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

func (f *fakeAcceptor) AcceptTCP() (*net.TCPConn, error) {
	if len(f.errs) == 0 {
		return nil, net.ErrClosed
	}
	err := f.errs[0]
	f.errs = f.errs[1:]
	return nil, err
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
	err := serve(&fakeAcceptor{errs: errs}, func(*net.TCPConn) { t.Error("handler called without a connection") },
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
