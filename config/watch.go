package config

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Watcher reports changes to a config file. It watches the file's
// directory, not the file: editors, config management tools and Kubernetes
// ConfigMaps replace a file by renaming another over it (or by swapping a
// symlink), which a watch on the file itself would miss after the first
// time.
//
// Only events that name the file, or a symlink on the way to it, count;
// other files of the directory (with /etc/l4lb.toml, all of /etc) are
// none of its business. A file counts once written: when its writer closes it or
// when it is renamed into place, not when it is created (empty) by
// `install`, `scp` or `curl -o`, whose writes would then be read half
// done. A removal counts too, so that the reload finds the file missing.
//
// Symlinks on the way to the file count as the file: a release
// directory swapped (/etc/l4lb/current -> releases/N), a config that is
// a symlink into another directory, or the `..data` symlink a Kubernetes
// ConfigMap or Secret volume swaps by rename to publish new files. Each symlink the path goes
// through is watched in its own directory, and the file where the path
// ends in its; after each change the path is resolved again and the
// watches follow it. Not seen: a hard link made in place of the file:
// SIGHUP covers it.
//
//	w, err := config.NewWatcher(path)
//	defer w.Close()
//	for range w.Changes() { reload() }
type Watcher struct {
	file    *os.File
	rc      syscall.RawConn // file's: watches are added under Control, never on a closed descriptor
	path    string
	dir     string
	base    string
	changes chan struct{}
	done    chan struct{}
	close   sync.Once

	// watched holds, per watch descriptor, its directory and the names
	// there whose events count. Owned by read once it runs.
	watched map[int32]watchedDir
}

type watchedDir struct {
	dir   string
	names map[string]bool
}

// watchMask covers every way a file can get new content: written in place
// (close after write), renamed into place, a symlink created or renamed in
// place, its mode or owner changed (a reload that could not read it may
// now), or removed.
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
		path:    path,
		dir:     dir,
		base:    filepath.Base(path),
		changes: make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	w.rc, _ = w.file.SyscallConn()
	w.follow()
	go w.read()
	return w, nil
}

// follow watches the directories the path goes through now: the path's
// own, each symlink's on the way, and the file's at the end, each for
// the names that count there; and drops the watches of directories the
// path left. Best effort beyond the path's own directory: a directory
// that cannot be watched leaves SIGHUP for what changes there.
func (w *Watcher) follow() {
	want := map[string]map[string]bool{w.dir: {w.base: true}}
	for _, link := range pathLinks(w.path) {
		if want[link.dir] == nil {
			want[link.dir] = map[string]bool{}
		}
		want[link.dir][link.name] = true
	}
	watched := make(map[int32]watchedDir)
	w.rc.Control(func(fd uintptr) {
		for dir, names := range want {
			wd, err := unix.InotifyAddWatch(int(fd), dir, watchMask)
			if err != nil {
				continue
			}
			// Two paths to one directory share its watch.
			d, ok := watched[int32(wd)]
			if !ok {
				d = watchedDir{dir: dir, names: map[string]bool{}}
				watched[int32(wd)] = d
			}
			for name := range names {
				d.names[name] = true
			}
		}
		for wd := range w.watched {
			if _, ok := watched[wd]; !ok {
				unix.InotifyRmWatch(int(fd), uint32(wd))
			}
		}
	})
	w.watched = watched
}

// pathLink is a name in a directory that resolving a path went through.
type pathLink struct{ dir, name string }

// pathLinks resolves path as the kernel does and returns each symlink it
// goes through, and where it ends: the file, or the first name missing.
// Directories are real (resolved) paths.
func pathLinks(path string) []pathLink {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil
	}
	var links []pathLink
	pending := strings.Split(abs, "/")
	resolved := "/"
	for hops := 0; len(pending) > 0; {
		name := pending[0]
		pending = pending[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		at := filepath.Join(resolved, name)
		fi, err := os.Lstat(at)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			if err != nil || len(pending) == 0 {
				return append(links, pathLink{resolved, name})
			}
			resolved = at
			continue
		}
		links = append(links, pathLink{resolved, name})
		target, err := os.Readlink(at)
		if hops++; err != nil || hops > 40 { // the kernel's limit, ELOOP
			return links
		}
		if filepath.IsAbs(target) {
			resolved = "/"
		}
		pending = append(strings.Split(target, "/"), pending...)
	}
	return links
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
			// The path may go through other directories now.
			w.follow()
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
		wd := int32(binary.NativeEndian.Uint32(b[0:4]))
		mask := binary.NativeEndian.Uint32(b[4:8])
		size := int(binary.NativeEndian.Uint32(b[12:16]))
		if unix.SizeofInotifyEvent+size > len(b) {
			return true // cannot happen; a change is the safe guess
		}
		name := strings.TrimRight(string(b[unix.SizeofInotifyEvent:unix.SizeofInotifyEvent+size]), "\x00")
		b = b[unix.SizeofInotifyEvent+size:]
		found = found || w.counts(wd, mask, name)
	}
	return found
}

// counts reports whether an event (its watch, its mask, and the name in
// the directory it is about) is a change of the file.
func (w *Watcher) counts(wd int32, mask uint32, name string) bool {
	d := w.watched[wd]
	switch {
	case mask&unix.IN_Q_OVERFLOW != 0:
		return true // events were lost: the file's among them, perhaps
	case mask&unix.IN_IGNORED != 0:
		// The directory is gone (or its watch dropped by follow): the
		// path goes elsewhere, or nowhere, which the next change shows.
		return false
	case !d.names[name]:
		return false
	case mask&unix.IN_CREATE != 0:
		// A regular file is created empty and counts once its writer
		// closes it (IN_CLOSE_WRITE); a symlink is whole when made.
		fi, err := os.Lstat(filepath.Join(d.dir, name))
		return errors.Is(err, os.ErrNotExist) || (err == nil && !fi.Mode().IsRegular())
	default:
		return true
	}
}
