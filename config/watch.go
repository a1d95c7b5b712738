package config

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Watcher reports changes to a config file. It watches the file's
// directory, not the file: editors, config management tools and Kubernetes
// ConfigMaps replace a file by renaming another over it (or by swapping a
// symlink), which a watch on the file itself would miss after the first
// time.
//
// Only events that name the file count, and those naming `..data`, the
// symlink a Kubernetes ConfigMap volume swaps to publish new files; other
// files of the directory (with /etc/l4lb.toml, all of /etc) are none of
// its business. A file counts once written: when its writer closes it or
// when it is renamed into place, not when it is created (empty) by
// `install`, `scp` or `curl -o`, whose writes would then be read half
// done. A removal counts too, so that the reload finds the file missing.
// Not seen: a hard link made in place of the file, and swaps of a symlink
// in another directory (a symlinked parent directory, or a config that
// is a symlink into another directory): SIGHUP covers those.
//
//	w, err := config.NewWatcher(path)
//	defer w.Close()
//	for range w.Changes() { reload() }
type Watcher struct {
	file    *os.File
	dir     string
	base    string
	changes chan struct{}
	done    chan struct{}
	close   sync.Once
}

// watchMask covers every way a file can get new content: written in place
// (close after write), renamed into place, a symlink created or renamed in
// place, its mode or owner changed (a reload that could not read it may
// now), or removed.
const watchMask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_CREATE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_ATTRIB

// k8sData is the symlink in a Kubernetes ConfigMap or Secret volume that
// the kubelet swaps (by rename) to publish a new version of every file.
const k8sData = "..data"

// NewWatcher starts watching the directory of path.
func NewWatcher(path string) (*Watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("watch %s: inotify_init: %w", path, err)
	}
	dir := filepath.Dir(path)
	if _, err := unix.InotifyAddWatch(fd, dir, watchMask); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	w := &Watcher{
		// A non-blocking descriptor makes os.File use the netpoller, so
		// Close unblocks a pending Read.
		file:    os.NewFile(uintptr(fd), "inotify"),
		dir:     dir,
		base:    filepath.Base(path),
		changes: make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	go w.read()
	return w, nil
}

// Changes delivers a value after one or more events; events that arrive
// while a value is pending are merged into it.
func (w *Watcher) Changes() <-chan struct{} { return w.changes }

// Close stops the watcher; Changes is closed once it has stopped.
func (w *Watcher) Close() error {
	var err error
	w.close.Do(func() {
		err = w.file.Close()
		<-w.done
	})
	return err
}

func (w *Watcher) read() {
	defer close(w.done)
	defer close(w.changes)
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := w.file.Read(buf)
		if err != nil {
			// Closed by Close, or an inotify failure that would repeat
			// forever: either way this watcher is done. SIGHUP still works.
			return
		}
		if w.anyCounts(buf[:n]) {
			select {
			case w.changes <- struct{}{}:
			default:
			}
		}
	}
}

// anyCounts reports whether one of the inotify events in b is a change of
// the file (counts).
func (w *Watcher) anyCounts(b []byte) bool {
	found := false
	for len(b) >= unix.SizeofInotifyEvent {
		// struct inotify_event: wd int32, mask uint32, cookie uint32,
		// len uint32, then len bytes of NUL-padded name.
		mask := binary.NativeEndian.Uint32(b[4:8])
		size := int(binary.NativeEndian.Uint32(b[12:16]))
		if unix.SizeofInotifyEvent+size > len(b) {
			return true // cannot happen; a change is the safe guess
		}
		name := strings.TrimRight(string(b[unix.SizeofInotifyEvent:unix.SizeofInotifyEvent+size]), "\x00")
		b = b[unix.SizeofInotifyEvent+size:]
		found = found || w.counts(mask, name)
	}
	return found
}

// counts reports whether an event (its mask, and the name in the
// directory it is about) is a change of the file.
func (w *Watcher) counts(mask uint32, name string) bool {
	switch {
	case mask&unix.IN_Q_OVERFLOW != 0:
		return true // events were lost: the file's among them, perhaps
	case name == k8sData:
		return mask&(unix.IN_MOVED_TO|unix.IN_CREATE) != 0
	case name != w.base:
		return false
	case mask&unix.IN_CREATE != 0:
		// A regular file is created empty and counts once its writer
		// closes it (IN_CLOSE_WRITE); a symlink is whole when made.
		fi, err := os.Lstat(filepath.Join(w.dir, name))
		return errors.Is(err, os.ErrNotExist) || (err == nil && !fi.Mode().IsRegular())
	default:
		return true
	}
}
