package main

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"

	"github.com/l4lb/l4lb/config"
)

// processIDs resolves p.User and p.Group (names or numbers) to the uid
// and gid l4lb will run as; Group "" is the user's primary group. run
// calls it before binding anything, and check too, so that a user missing
// on this host is reported before a single service starts.
func processIDs(p config.Process) (uid, gid int, err error) {
	u, err := user.Lookup(p.User)
	if err != nil {
		if !isNumber(p.User) {
			return 0, 0, fmt.Errorf("process.user %q: no such user on this host", p.User)
		}
		if u, err = user.LookupId(p.User); err != nil {
			return 0, 0, fmt.Errorf("process.user %q: %w", p.User, err)
		}
	}
	if uid, err = strconv.Atoi(u.Uid); err != nil {
		return 0, 0, fmt.Errorf("process.user %q: uid %q: %w", p.User, u.Uid, err)
	}
	gidStr := u.Gid
	if p.Group != "" {
		g, err := user.LookupGroup(p.Group)
		if err != nil {
			if !isNumber(p.Group) {
				return 0, 0, fmt.Errorf("process.group %q: no such group on this host", p.Group)
			}
			if g, err = user.LookupGroupId(p.Group); err != nil {
				return 0, 0, fmt.Errorf("process.group %q: %w", p.Group, err)
			}
		}
		gidStr = g.Gid
	}
	if gid, err = strconv.Atoi(gidStr); err != nil {
		return 0, 0, fmt.Errorf("process.group: gid %q: %w", gidStr, err)
	}
	return uid, gid, nil
}

// isNumber reports whether s is a uid or gid rather than a name.
func isNumber(s string) bool {
	_, err := strconv.Atoi(s)
	return err == nil
}

// dropPrivileges makes the whole process run as p.User (and p.Group, or
// the user's primary group) from now on. It runs once the sockets are
// bound: binding ports below 1024 is what root was needed for. On Linux,
// Go applies setuid and setgid to every thread of the process.
func dropPrivileges(p config.Process) error {
	if p.User == "" {
		return nil
	}
	uid, gid, err := processIDs(p)
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		if os.Geteuid() == uid {
			return nil // already that user
		}
		return fmt.Errorf("process.user %q: l4lb runs as uid %d, not root: it cannot change user", p.User, os.Geteuid())
	}
	// Supplementary groups first, then the group, then the user: after
	// setuid nothing else may be changed.
	if err := syscall.Setgroups([]int{gid}); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("setgid %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("setuid %d: %w", uid, err)
	}
	return nil
}
