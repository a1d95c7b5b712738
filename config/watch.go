package config

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// Watcher reports changes to a config file. It watches the file's
// directory, not the file: editors, config management tools and Kubernetes
// ConfigMaps replace a file by renaming another over it (or by swapping a
// symlink), which a watch on the file itself would miss after the first
// time. Events for other files in the directory are reported too; callers
// compare content hashes to tell real changes apart, which a burst of
// renames needs anyway.
//
//	w, err := config.NewWatcher(path)
//	defer w.Close()
//	for range w.Changes() { reload() }
type Watcher struct {
	file    *os.File
	changes chan struct{}
	done    chan struct{}
	close   sync.Once
}

// watchMask covers every way a file can get new content: written in place
// (close after write), renamed into place, created, or its symlink changed.
const watchMask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_CREATE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_ATTRIB

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
		if n > 0 {
			select {
			case w.changes <- struct{}{}:
			default:
			}
		}
	}
}
