/* The pod sandbox's process (what Kubernetes' "pause" image runs), built here with
 * `gcc -static` because no image can be pulled: it holds the pod's namespaces, reaps
 * orphaned children and exits on SIGINT/SIGTERM. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
static void quit(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
