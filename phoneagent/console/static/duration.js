// A call's duration as the console shows it (m:ss, or h:mm:ss): one formatter for the live
// calls list and a live call's page, loaded before their scripts.
window.consoleDuration = function consoleDuration(seconds) {
  const whole = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const secs = String(whole % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
};
