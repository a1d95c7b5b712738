package main

import (
	"errors"
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
// on this host is reported before a single service starts. A number with
// no entry in the user database is taken as it is, as HAProxy's uid is
// (containers often have none); its group must then be given.
func processIDs(p config.Process) (uid, gid int, err error) {
	gidStr := ""
	u, err := lookupUser(p.User)
	switch {
	case err == nil:
		uid, err = strconv.Atoi(u.Uid)
		if err != nil {
			return 0, 0, fmt.Errorf("process.user %q: uid %q: %w", p.User, u.Uid, err)
		}
		gidStr = u.Gid
	case isUnknown(err) && isNumber(p.User):
		uid, _ = strconv.Atoi(p.User)
		if p.Group == "" {
			return 0, 0, fmt.Errorf("process.user %q has no entry on this host, so no primary group: set process.group too", p.User)
		}
	case isUnknown(err):
		return 0, 0, fmt.Errorf("process.user %q: no such user on this host", p.User)
	default:
		return 0, 0, fmt.Errorf("process.user %q: %w", p.User, err)
	}
	if p.Group != "" {
		g, err := lookupGroup(p.Group)
		switch {
		case err == nil:
			gidStr = g.Gid
		case isUnknown(err) && isNumber(p.Group):
			gidStr = p.Group
		case isUnknown(err):
			return 0, 0, fmt.Errorf("process.group %q: no such group on this host", p.Group)
		default:
			return 0, 0, fmt.Errorf("process.group %q: %w", p.Group, err)
		}
	}
	if gid, err = strconv.Atoi(gidStr); err != nil {
		return 0, 0, fmt.Errorf("process.group: gid %q: %w", gidStr, err)
	}
	return uid, gid, nil
}

// lookupUser finds name, or a number as a uid.
func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if isUnknown(err) && isNumber(name) {
		return user.LookupId(name)
	}
	return u, err
}

// lookupGroup finds name, or a number as a gid.
func lookupGroup(name string) (*user.Group, error) {
	g, err := user.LookupGroup(name)
	if isUnknown(err) && isNumber(name) {
		return user.LookupGroupId(name)
	}
	return g, err
}

// isUnknown reports whether a lookup failed for want of an entry, rather
// than for a database that could not be read.
func isUnknown(err error) bool {
	var noUser user.UnknownUserError
	var noUID user.UnknownUserIdError
	var noGroup user.UnknownGroupError
	var noGID user.UnknownGroupIdError
	return errors.As(err, &noUser) || errors.As(err, &noUID) || errors.As(err, &noGroup) || errors.As(err, &noGID)
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
