/* Socket flags that not every platform defines, with the fallback used
 * where one is missing. _frames.pyx uses FASTRELAY_MSG_* only.
 *
 * MSG_NOSIGNAL (sendmsg: no SIGPIPE when the peer is gone) is missing on
 * macOS under strict POSIX headers and on some BSDs. The fallback is 0:
 * CPython sets SIGPIPE to SIG_IGN at startup, so a write to a vanished peer
 * fails with EPIPE either way and the connection is dropped.
 *
 * MSG_DONTWAIT hides behind the same feature macros on macOS. The fallback
 * is 0: the event loop's sockets are already non-blocking (O_NONBLOCK).
 *
 * FASTRELAY_ASSUME_NO_MSG_NOSIGNAL / FASTRELAY_ASSUME_NO_MSG_DONTWAIT
 * (-D at compile time) undefine the system's macro first, so a Linux build
 * takes the fallback exactly as such a platform would: .ci/portability.sh
 * builds that way and runs the relay. */
#ifndef FASTRELAY_COMPAT_H
#define FASTRELAY_COMPAT_H

#include <sys/types.h>
#include <sys/socket.h>

#ifdef FASTRELAY_ASSUME_NO_MSG_NOSIGNAL
#undef MSG_NOSIGNAL
#endif
#ifdef MSG_NOSIGNAL
#define FASTRELAY_MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define FASTRELAY_MSG_NOSIGNAL 0
#pragma message("fastrelay: no MSG_NOSIGNAL here; sendmsg relies on SIGPIPE being ignored")
#endif

#ifdef FASTRELAY_ASSUME_NO_MSG_DONTWAIT
#undef MSG_DONTWAIT
#endif
#ifdef MSG_DONTWAIT
#define FASTRELAY_MSG_DONTWAIT MSG_DONTWAIT
#else
#define FASTRELAY_MSG_DONTWAIT 0
#pragma message("fastrelay: no MSG_DONTWAIT here; sendmsg relies on O_NONBLOCK")
#endif

#endif /* FASTRELAY_COMPAT_H */
