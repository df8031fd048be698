// Typed, non-variadic wrappers around libcurl's variadic entry points, so Swift can call them.
#ifndef GATEHOUSE_CCURL_SHIM_H
#define GATEHOUSE_CCURL_SHIM_H
#include <curl/curl.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

typedef size_t (*gh_curl_data_cb)(char *ptr, size_t size, size_t nmemb, void *userdata);

static inline CURLcode gh_easy_setopt_long(CURL *h, CURLoption o, long v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode gh_easy_setopt_off(CURL *h, CURLoption o, curl_off_t v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode gh_easy_setopt_string(CURL *h, CURLoption o, const char *v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode gh_easy_setopt_pointer(CURL *h, CURLoption o, void *v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode gh_easy_setopt_slist(CURL *h, CURLoption o, struct curl_slist *v) { return curl_easy_setopt(h, o, v); }
/* Sockets that close with a reset instead of a FIN: they leave no TIME_WAIT behind (for connections used once). */
static int gh_linger_zero(void *clientp, curl_socket_t fd, curlsocktype purpose) {
  struct linger value = { 1, 0 };
  (void)clientp; (void)purpose;
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &value, sizeof value);
  return CURL_SOCKOPT_OK;
}
static inline CURLcode gh_easy_close_with_reset(CURL *h) { return curl_easy_setopt(h, CURLOPT_SOCKOPTFUNCTION, gh_linger_zero); }
static inline CURLcode gh_easy_setopt_data_cb(CURL *h, CURLoption o, gh_curl_data_cb v) { return curl_easy_setopt(h, o, v); }
static inline CURLcode gh_easy_setopt_closesocket_cb(CURL *h, curl_closesocket_callback v) { return curl_easy_setopt(h, CURLOPT_CLOSESOCKETFUNCTION, v); }
static inline CURLcode gh_easy_getinfo_long(CURL *h, CURLINFO i, long *v) { return curl_easy_getinfo(h, i, v); }
static inline CURLcode gh_easy_getinfo_off(CURL *h, CURLINFO i, curl_off_t *v) { return curl_easy_getinfo(h, i, v); }
static inline CURLcode gh_easy_getinfo_pointer(CURL *h, CURLINFO i, void **v) { return curl_easy_getinfo(h, i, v); }
static inline CURLcode gh_easy_getinfo_socket(CURL *h, CURLINFO i, curl_socket_t *v) { return curl_easy_getinfo(h, i, v); }
static inline CURLMcode gh_multi_setopt_long(CURLM *m, CURLMoption o, long v) { return curl_multi_setopt(m, o, v); }
static inline CURLMcode gh_multi_setopt_pointer(CURLM *m, CURLMoption o, void *v) { return curl_multi_setopt(m, o, v); }
static inline CURLMcode gh_multi_setopt_socket_cb(CURLM *m, curl_socket_callback v) { return curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, v); }
static inline CURLMcode gh_multi_setopt_timer_cb(CURLM *m, curl_multi_timer_callback v) { return curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, v); }

static const size_t GH_CURL_WRITEFUNC_PAUSE = CURL_WRITEFUNC_PAUSE;
static const size_t GH_CURL_READFUNC_PAUSE = CURL_READFUNC_PAUSE;
static const size_t GH_CURL_READFUNC_ABORT = CURL_READFUNC_ABORT;
static const int GH_CURLPAUSE_CONT = CURLPAUSE_CONT;
static const curl_socket_t GH_CURL_SOCKET_TIMEOUT = CURL_SOCKET_TIMEOUT;

#endif
